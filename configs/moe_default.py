"""A CPU-sized Mixture-of-Experts model (`make train ARGS=--config=configs/moe_default.py`): the default dense shape
with layers 1-3 as 8 SwiGLU experts, top-2, each half of d_ff wide (active MLP compute equals the dense default's),
layer 0 dense as in DeepSeek-MoE. Trains in minutes on 2 CPU cores (2.22M parameters, 1.00M active per token with
the 2048-token tokenizer)."""

from configs import base, default


def get_config():
    config = default.get_config()
    dense = config.model
    config.model = base.model_section(**{**dense.to_dict(), "n_experts": 8, "n_experts_per_tok": 2,
                                         "moe_d_ff": dense.d_ff // 2, "moe_first_dense": 1})
    return config
