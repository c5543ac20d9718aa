import jax.numpy as jnp
from flax import linen as nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the compute dtype, cast back before the scale (as Hugging Face Llama)."""

    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
        return scale.astype(self.dtype) * normed.astype(self.dtype)
