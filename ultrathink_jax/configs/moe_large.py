"""ULTRATHINK Large-MoE: the Large shape with every MLP replaced by 8 SwiGLU experts, top-2 routing. Each expert is
half as wide as Large's MLP, so the active MLP compute per token equals Large's (3.75B parameters, 1.32B active per
token)."""

from ultrathink_jax.configs import base, large


def get_config():
    return base.moe_variant(large.get_config())
