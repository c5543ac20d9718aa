from flax import linen as nn

from ultrathink_jax.activations import ACTIVATION_FNS
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.layers.init import residual_out_init, weight_init


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    config: ModelConfig
    d_ff: int

    @nn.compact
    def __call__(self, x):
        cfg = self.config

        def dense(features, names, init, name):
            return nn.Dense(features, use_bias=False, dtype=cfg.dtype, name=name,
                            kernel_init=nn.with_logical_partitioning(init, names))

        gate = dense(self.d_ff, ("embed", "mlp"), weight_init(cfg), "gate_proj")(x)
        up = dense(self.d_ff, ("embed", "mlp"), weight_init(cfg), "up_proj")(x)
        h = nn.with_logical_constraint(ACTIVATION_FNS[cfg.activation](gate) * up, ("act_batch", "act_length", "act_mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), residual_out_init(cfg), "down_proj")(h)
