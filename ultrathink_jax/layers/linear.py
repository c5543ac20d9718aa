import math
from typing import Callable

import jax.numpy as jnp
from flax import linen as nn


class Linear(nn.Module):
    """Contracts the last `n_in` axes of x with a kernel of shape `shape` (inputs first), e.g. [D] -> [heads, head_dim].

    Used instead of nn.Dense / nn.DenseGeneral: DenseGeneral's init reshapes a flat kernel and so cannot carry one
    logical name per axis, and both contract x with its leading axes kept, which XLA:CPU lowers with layout copies.
    """

    shape: tuple[int, ...]
    n_in: int
    names: tuple[str, ...]
    kernel_init: Callable
    dtype: str

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.names), self.shape, jnp.float32)
        # One 2-D matmul [rows, in] @ [in, out] (the reshapes are free): with several leading or contracting axes
        # XLA:CPU transposes the backward's operands into the layout its matmul wants, fused with the elementwise
        # gradients; 2-D operands need no copy (SwiGLU forward + backward measured 1.8x faster, BENCHMARKS.md).
        k = math.prod(self.shape[:self.n_in])
        y = x.reshape(-1, k).astype(self.dtype) @ kernel.reshape(k, -1).astype(self.dtype)
        return y.reshape(*x.shape[:x.ndim - self.n_in], *self.shape[self.n_in:])
