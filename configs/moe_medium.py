"""ULTRATHINK Medium-MoE: the Medium shape with every MLP replaced by 8 SwiGLU experts, top-2 routing. Each expert is
half as wide as Medium's MLP, so the active MLP compute per token equals Medium's (2.12B parameters, 757M active
per token)."""

from configs import base, medium


def get_config():
    config = medium.get_config()
    dense = config.model
    config.model = base.model_section(**{**dense.to_dict(), "n_experts": 8, "n_experts_per_tok": 2,
                                         "moe_d_ff": dense.d_ff // 2})
    return config
