"""Token losses in float32. Functions return (weighted sum, weight sum) so callers can accumulate exactly across
micro-batches, devices and eval batches before dividing once."""

import jax
import jax.numpy as jnp


def cross_entropy(logits, targets, weights):
    """Next-token cross-entropy; logits [B, T, V] already aligned with targets [B, T] (the data shifts by one)."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    # A select over the vocabulary, not take_along_axis: its gradient is elementwise, where a gather's is a scatter
    # into a zeroed [B, T, V] buffer.
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
    target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    return jnp.sum((log_z - target_logit) * weights), jnp.sum(weights)


def logit_z_loss(logits, weights):
    """PaLM's z-loss: mean of log(Z)^2 over weighted tokens, returned as a weighted sum; keeps the softmax normaliser
    near 1 so bf16 logits stay in range."""
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.square(log_z) * weights)
