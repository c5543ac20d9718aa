"""ULTRATHINK Tiny-MoE: the Tiny shape with every MLP replaced by 8 SwiGLU experts, top-2 routing. Each expert is half
as wide as Tiny's MLP, so the active MLP compute per token equals Tiny's (293M parameters, 124M active per token)."""

from ultrathink_jax.configs import base, tiny


def get_config():
    return base.moe_variant(tiny.get_config())
