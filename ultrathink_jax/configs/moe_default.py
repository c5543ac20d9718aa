"""A CPU-sized Mixture-of-Experts model (`make train ARGS=--config=configs/moe_default.py`): the default dense shape
with every layer's MLP replaced by 8 SwiGLU experts, top-2, each half of d_ff wide (active MLP compute equals the
dense default's). MoE in every layer is the Mixtral layout, which every hand-off target runs (transformers, lm-eval,
llama.cpp's GGUF); a dense layer 0 (DeepSeek-MoE style, `moe_first_dense=1`) exports as Qwen2-MoE, which llama.cpp
cannot run, and measured no better (held-out loss after 150 steps 5.177 with it vs 5.160 without, BENCHMARKS.md).
Trains in minutes on 2 CPU cores (2.63M parameters, 1.00M active per token with the 2048-token tokenizer)."""

from ultrathink_jax.configs import base, default


def get_config():
    return base.moe_variant(default.get_config())
