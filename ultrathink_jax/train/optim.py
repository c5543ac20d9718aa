"""AdamW with warmup + decay schedule, global-norm clipping, and weight decay on matrices only."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ultrathink_jax.train.config import warmup_steps

NO_DECAY = ("scale", "bias")  # norm scales and biases: decaying them toward 0 only hurts


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak over `warmup_steps(optim, total_steps)` steps (step s gets (s+1)/warmup, so the
    first update is not wasted), then cosine or linear decay to `min_lr_ratio * peak` at `total_steps`, or
    constant."""
    peak, end = optim.learning_rate, optim.learning_rate * optim.min_lr_ratio
    warmup, kind = warmup_steps(optim, total_steps), optim.schedule
    decay_steps = max(total_steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum(1.0, (step + 1) / warmup) if warmup else peak
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if kind == "cosine":
            decayed = end + (peak - end) * 0.5 * (1 + jnp.cos(math.pi * progress))
        elif kind == "linear":
            decayed = peak + (end - peak) * progress
        else:
            decayed = jnp.asarray(peak, jnp.float32)
        return jnp.where(step < warmup, warm, decayed)

    return schedule


def decay_mask(params):
    """True for leaves that get weight decay: every matrix and the embedding; not norm scales or biases.
    Decided by name, not ndim: scanned layers give norm scales a leading [n_units] axis."""
    def decays(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return not names or names[-1] not in NO_DECAY

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(optim, total_steps)
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                        mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw) if optim.grad_clip > 0 else adamw
    return tx, schedule
