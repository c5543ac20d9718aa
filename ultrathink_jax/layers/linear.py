from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn


class Linear(nn.Module):
    """Contracts the last `n_in` axes of x with a kernel of shape `shape` (inputs first), e.g. [D] -> [heads, head_dim].

    Used instead of nn.DenseGeneral, whose init reshapes a flat kernel and so cannot carry one logical name per axis.
    """

    shape: tuple[int, ...]
    n_in: int
    names: tuple[str, ...]
    kernel_init: Callable
    dtype: str

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.names), self.shape, jnp.float32)
        dims = ((tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))), ((), ()))
        return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), dims)
