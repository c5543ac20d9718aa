"""ULTRATHINK Xl-MoE: the Xl shape with every MLP replaced by 8 SwiGLU experts, top-2 routing. Each expert is half as
wide as Xl's MLP, so the active MLP compute per token equals Xl's (7.76B parameters, 2.67B active per token)."""

from ultrathink_jax.configs import base, xl


def get_config():
    return base.moe_variant(xl.get_config())
