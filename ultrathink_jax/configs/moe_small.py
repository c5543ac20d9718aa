"""ULTRATHINK Small-MoE: the Small shape with every MLP replaced by 8 SwiGLU experts, top-2 routing. Each expert is
half as wide as Small's MLP, so the active MLP compute per token equals Small's (964M parameters, 355M active per
token)."""

from ultrathink_jax.configs import base, small


def get_config():
    return base.moe_variant(small.get_config())
