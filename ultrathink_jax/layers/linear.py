import math
from typing import Callable

import jax
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
        # gradients; 2-D operands need no copy (measured on SwiGLU forward + backward: BENCHMARKS.md).
        k = math.prod(self.shape[:self.n_in])
        y = matmul(x.reshape(-1, k).astype(self.dtype), kernel.reshape(k, -1).astype(self.dtype))
        return y.reshape(*x.shape[:x.ndim - self.n_in], *self.shape[self.n_in:])


# Kernels up to this many elements get their weight gradient as untransposed(x) @ dy on CPU: for small kernels
# XLA:CPU's transposed-operand dot is slower than materialising x^T and an ordinary matmul; large kernels (width
# 512's, 131K-721K elements) are not, and keep XLA's x^T dy (BENCHMARKS.md, "Training step: where the time goes",
# round 8).
CPU_SMALL_KERNEL_ELEMENTS = 1 << 16


def matmul(x, w):
    """x [n, k] @ w [k, m]. On CPU, for a small kernel, the backward's weight gradient is an ordinary matmul
    (`small_kernel_matmul`, on YNNPACK) instead of the transposed-operand x^T dy, which XLA:CPU runs on Eigen's
    multi-threaded dot. Chosen by the whole step's time: alone, on two cores, neither form wins every shape."""
    if jax.default_backend() == "cpu" and w.size <= CPU_SMALL_KERNEL_ELEMENTS:
        return small_kernel_matmul(x, w)
    return x @ w


@jax.custom_vjp
def small_kernel_matmul(x, w):
    """x @ w, with the gradient in w computed as untransposed(x) @ dy."""
    return x @ w


def _small_kernel_matmul_fwd(x, w):
    return x @ w, (x, w)


def _small_kernel_matmul_bwd(residuals, dy):
    x, w = residuals
    return dy @ w.T, untransposed(x) @ dy


small_kernel_matmul.defvjp(_small_kernel_matmul_fwd, _small_kernel_matmul_bwd)


def untransposed(x):
    """x [..., a, b] -> its transpose [..., b, a], materialised on CPU, for a matmul that contracts x's axis a. A
    batched matmul contracting the leading (row) axis of both operands, as every weight or key/value gradient does
    (x^T dy), runs on Eigen on XLA:CPU, not YNNPACK, and XLA folds a plain transpose back into such a matmul; the
    barrier keeps the copy, and the matmul becomes an ordinary one (measured on attention and the dropless MoE
    step: BENCHMARKS.md, round 7). Other backends' matmuls
    take transposed operands natively: there x^T is left to XLA."""
    x = jnp.swapaxes(x, -1, -2)
    return jax.lax.optimization_barrier(x) if jax.default_backend() == "cpu" else x


def transposed_result(y):
    """y [..., a, b] (a matmul's result) -> [..., b, a], transposed after the matmul on CPU: without the barrier XLA
    folds the transpose into the matmul by swapping its operands, which gives back the transposed-operand form
    `untransposed` avoids."""
    if jax.default_backend() != "cpu":
        return jnp.swapaxes(y, -1, -2)
    return jnp.swapaxes(jax.lax.optimization_barrier(y), -1, -2)


@jax.custom_vjp
def batched_matmul(a, b):
    """a [n, t, d] @ b [n, d, f] -> [n, t, f], with the gradient in b computed as untransposed(a) @ dy."""
    return jnp.einsum("ntd,ndf->ntf", a, b)


def _batched_matmul_fwd(a, b):
    return batched_matmul(a, b), (a, b)


def _batched_matmul_bwd(residuals, dy):
    a, b = residuals
    return (_sum_over_extra_axes(jnp.einsum("ntf,ndf->ntd", dy, b), a),
            _sum_over_extra_axes(jnp.einsum("ndt,ntf->ndf", untransposed(a), dy), b))


batched_matmul.defvjp(_batched_matmul_fwd, _batched_matmul_bwd)


def _sum_over_extra_axes(cotangent, primal):
    """Inside shard_map, a cotangent that varies over mesh axes its primal does not (a replicated operand times a
    sharded one) holds per-shard partial sums: psum them, as autodiff's own transpose of the implicit pvary does."""
    extra = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
    return jax.lax.psum(cotangent, extra) if extra else cotangent


def _varying_axes(x) -> frozenset:
    """The shard_map mesh axes x varies over (empty outside shard_map): `manual_axis_type.varying` in jax 0.10,
    `vma` in earlier releases."""
    aval = jax.typeof(x)
    return aval.manual_axis_type.varying if hasattr(aval, "manual_axis_type") else frozenset(getattr(aval, "vma", ()))
