"""ULTRATHINK Medium-MoE: the Medium shape with every MLP replaced by 8 SwiGLU experts, top-2 routing. Each expert is
half as wide as Medium's MLP, so the active MLP compute per token equals Medium's (2.12B parameters, 757M active
per token)."""

from ultrathink_jax.configs import base, medium


def get_config():
    return base.moe_variant(medium.get_config())
