"""ULTRATHINK Large-MoE: the Large shape with every MLP replaced by 8 SwiGLU experts, top-2 routing. Each expert is
half as wide as Large's MLP, so the active MLP compute per token equals Large's (3.75B parameters, 1.32B active per
token)."""

from configs import base, large


def get_config():
    config = large.get_config()
    dense = config.model
    config.model = base.model_section(**{**dense.to_dict(), "n_experts": 8, "n_experts_per_tok": 2,
                                         "moe_d_ff": dense.d_ff // 2})
    return config
