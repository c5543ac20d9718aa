"""ULTRATHINK Small-MoE: the Small shape with every MLP replaced by 8 SwiGLU experts, top-2 routing. Each expert is
half as wide as Small's MLP, so the active MLP compute per token equals Small's (964M parameters, 355M active per
token)."""

from configs import base, small


def get_config():
    config = small.get_config()
    dense = config.model
    config.model = base.model_section(**{**dense.to_dict(), "n_experts": 8, "n_experts_per_tok": 2,
                                         "moe_d_ff": dense.d_ff // 2})
    return config
