"""A CPU-sized Mixture-of-Experts model (`make train ARGS=--config=configs/moe_default.py`): the default dense shape
with layers 1-3 as 8 SwiGLU experts, top-2, each half of d_ff wide (active MLP compute equals the dense default's),
layer 0 dense as in DeepSeek-MoE. Trains in minutes on 2 CPU cores (2.22M parameters, 1.00M active per token with
the 2048-token tokenizer)."""

from configs import base, default


def get_config():
    return base.moe_variant(default.get_config(), moe_first_dense=1)
