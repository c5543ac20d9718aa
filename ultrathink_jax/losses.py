"""Token losses in float32. Functions return (weighted sum, weight sum) so callers can accumulate exactly across
micro-batches, devices and eval batches before dividing once."""

import functools

import jax
import jax.numpy as jnp

from ultrathink_jax.layers.linear import transposed_result, untransposed


def cross_entropy(logits, targets, weights):
    """Next-token cross-entropy; logits [B, T, V] already aligned with targets [B, T] (the data shifts by one)."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    # A select over the vocabulary, not take_along_axis: its gradient is elementwise, where a gather's is a scatter
    # into a zeroed [B, T, V] buffer.
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
    target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    return jnp.sum((log_z - target_logit) * weights), jnp.sum(weights)


def head_cross_entropy(hidden, kernel, targets, weights, *, vocab_major: bool, dtype, z_loss_weight: float = 0.0,
                       chunk_len: int = 0):
    """The output head and its cross-entropy (+ z-loss) for training, with the [B, T, V] logits never whole.

    hidden [B, T, D]: the final-normed activations; kernel: the head's float32 weight, [V, D] if vocab_major (a
    tied embedding table) else [D, V]; logits = hidden @ kernel in `dtype`, then float32, as `Transformer` computes
    them. The sequence is cut into chunks of `chunk_len` positions (0 = one chunk), and each chunk's logits, loss and
    gradients are computed together in the forward pass (the gradient of a scalar loss is known up to its scale):
    a chunk's logits can then stay in cache, where the whole [B, T, V] logits and their gradient are passes over
    main memory. Returns (objective, ce_sum, z_sum, weight_sum) with objective = ce_sum + z_loss_weight * z_sum;
    only the objective is differentiable (in hidden and kernel); the sums are statistics.
    """
    T = hidden.shape[1]
    chunk_len = chunk_len or T
    if T % chunk_len:
        raise ValueError(f"head_cross_entropy: chunk_len {chunk_len} does not divide the sequence length {T}")
    objective, ce_sum, z_sum = _head_objective(hidden, kernel, targets, weights, vocab_major, jnp.dtype(dtype),
                                               float(z_loss_weight), chunk_len)
    return objective, jax.lax.stop_gradient(ce_sum), jax.lax.stop_gradient(z_sum), jnp.sum(weights)


def logits_chunk_len(batch: int, seq_len: int, vocab: int, budget_bytes: float) -> int:
    """The longest chunk of the sequence (a divisor of seq_len) whose float32 logits [batch, chunk, vocab] fit in
    budget_bytes; at least 1."""
    fits = [n for n in range(1, seq_len + 1) if seq_len % n == 0 and batch * n * vocab * 4 <= budget_bytes]
    return max(fits, default=1)


def _chunk(rows, kernel, targets, weights, vocab_major, dtype, z_loss_weight, with_grad):
    """One chunk, rows [N, D]: (ce_sum, z_sum) and, with_grad, the objective's gradients in rows and kernel."""
    w = kernel.astype(dtype)
    x = rows.astype(dtype)
    logits = (x @ (w.T if vocab_major else w)).astype(jnp.float32)
    top = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    e = jnp.exp(logits - top)
    total = e.sum(-1, keepdims=True)
    log_z = (top + jnp.log(total))[:, 0]
    # A gather of N logits, where `cross_entropy`'s select-and-sum (chosen there for autodiff) is an extra [N, V]
    # pass; this gradient is written by hand below. Clipped: a padding target (weight 0) reads a finite logit.
    target_logit = jnp.take_along_axis(logits, targets[:, None], -1, mode="clip")[:, 0]
    sums = jnp.sum((log_z - target_logit) * weights), jnp.sum(jnp.square(log_z) * weights)
    if not with_grad:
        return sums
    # d objective / d logits = w * ((1 + 2 z log Z) softmax - onehot): the z-loss term is z * w * log(Z)^2
    scale = weights * (1.0 + 2.0 * z_loss_weight * log_z) if z_loss_weight else weights
    is_target = jnp.arange(logits.shape[-1]) == targets[:, None]
    d = (scale[:, None] * (e / total) - jnp.where(is_target, weights[:, None], 0.0)).astype(dtype)
    d_rows = d @ (w if vocab_major else w.T)
    # The kernel's gradient [D, V] (input-major whatever the kernel's layout: `_head_objective_fwd` transposes it
    # once) contracts the chunk's rows. As x^T d with the small x^T materialised (`untransposed`) it is an ordinary
    # matmul, which XLA:CPU runs on YNNPACK; the transposed-operand d^T x runs on Eigen's slower dot and serialises
    # the head (measured: BENCHMARKS.md, train profile round 10).
    d_kernel = jnp.matmul(untransposed(x), d, preferred_element_type=jnp.float32)
    return sums, d_rows.astype(rows.dtype), d_kernel


def _chunks(hidden, kernel, targets, weights, vocab_major, dtype, z_loss_weight, chunk_len, with_grad):
    B, T, D = hidden.shape
    n = T // chunk_len

    def piece(i):
        cut = lambda a: jax.lax.dynamic_slice_in_dim(a, i * chunk_len, chunk_len, axis=1)
        return (cut(hidden).reshape(B * chunk_len, D), kernel, cut(targets).reshape(-1), cut(weights).reshape(-1),
                vocab_major, dtype, z_loss_weight, with_grad)

    if n == 1:
        out = _chunk(*piece(0))
        if not with_grad:
            return out
        sums, d_rows, d_kernel = out
        return sums, d_rows.reshape(B, T, D), d_kernel

    def body(i, carry):
        if not with_grad:
            return jax.tree.map(jnp.add, carry, _chunk(*piece(i)))
        sums, d_hidden, d_kernel = carry
        part, d_rows, d_k = _chunk(*piece(i))
        d_hidden = jax.lax.dynamic_update_slice_in_dim(d_hidden, d_rows.reshape(B, chunk_len, D), i * chunk_len, 1)
        return jax.tree.map(jnp.add, sums, part), d_hidden, d_kernel + d_k

    zero = (jnp.zeros((), jnp.float32),) * 2
    init = zero if not with_grad else (zero, jnp.zeros_like(hidden), jnp.zeros((D, kernel.size // D), jnp.float32))
    return jax.lax.fori_loop(0, n, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _head_objective(hidden, kernel, targets, weights, vocab_major, dtype, z_loss_weight, chunk_len):
    ce_sum, z_sum = _chunks(hidden, kernel, targets, weights, vocab_major, dtype, z_loss_weight, chunk_len, False)
    return ce_sum + z_loss_weight * z_sum, ce_sum, z_sum


def _head_objective_fwd(hidden, kernel, targets, weights, vocab_major, dtype, z_loss_weight, chunk_len):
    (ce_sum, z_sum), d_hidden, d_kernel = _chunks(hidden, kernel, targets, weights, vocab_major, dtype,
                                                  z_loss_weight, chunk_len, True)
    d_kernel = transposed_result(d_kernel) if vocab_major else d_kernel  # [D, V] -> the kernel's [V, D]
    return (ce_sum + z_loss_weight * z_sum, ce_sum, z_sum), (d_hidden, d_kernel.astype(kernel.dtype))


def _head_objective_bwd(vocab_major, dtype, z_loss_weight, chunk_len, residuals, cotangents):
    d_hidden, d_kernel = residuals
    g = cotangents[0]  # the statistics' cotangents are zero: head_cross_entropy stops their gradient
    return (g * d_hidden).astype(d_hidden.dtype), g * d_kernel, None, None


_head_objective.defvjp(_head_objective_fwd, _head_objective_bwd)
