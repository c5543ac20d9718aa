from flax import linen as nn

from ultrathink_jax.activations import ACTIVATION_FNS
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.layers.init import residual_out_init, weight_init
from ultrathink_jax.layers.linear import Linear


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    config: ModelConfig
    d_ff: int

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        d = x.shape[-1]
        gate = Linear((d, self.d_ff), 1, ("embed", "mlp"), weight_init(cfg), cfg.dtype, name="gate_proj")(x)
        up = Linear((d, self.d_ff), 1, ("embed", "mlp"), weight_init(cfg), cfg.dtype, name="up_proj")(x)
        h = nn.with_logical_constraint(ACTIVATION_FNS[cfg.activation](gate) * up, ("act_batch", "act_length", "act_mlp"))
        return Linear((self.d_ff, d), 1, ("mlp", "embed"), residual_out_init(cfg), cfg.dtype, name="down_proj")(h)
