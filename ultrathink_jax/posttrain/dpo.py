"""Direct Preference Optimization (Rafailov et al. 2023), the sigmoid loss as TRL's DPOTrainer computes it:

    z = beta * ((pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)),   loss = mean(-log sigmoid(z))

where pi_* / ref_* are sums of the policy's / frozen reference's log-probabilities over the completion tokens
only (the row weights). Rows come interleaved: row 2i is pair i's chosen answer, row 2i+1 its rejected one.
Rewards are beta * (pi - ref); accuracy counts pairs whose chosen reward beats the rejected one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sequence_logps(logits, targets, weights):
    """Per row: sum over weighted targets of log p(target) (float32) [B]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token * weights, axis=-1)


def dpo_loss(policy_logps, reference_logps, beta: float):
    """(mean loss, metrics) from interleaved per-row log-prob sums [2P]."""
    pi_c, pi_r = policy_logps[0::2], policy_logps[1::2]
    ref = jax.lax.stop_gradient(reference_logps)
    ref_c, ref_r = ref[0::2], ref[1::2]
    z = beta * ((pi_c - pi_r) - (ref_c - ref_r))
    loss = jnp.mean(-jax.nn.log_sigmoid(z))
    chosen_reward = jax.lax.stop_gradient(beta * (pi_c - ref_c))
    rejected_reward = jax.lax.stop_gradient(beta * (pi_r - ref_r))
    metrics = {
        "loss": loss,
        "rewards/chosen": jnp.mean(chosen_reward),
        "rewards/rejected": jnp.mean(rejected_reward),
        "rewards/margin": jnp.mean(chosen_reward - rejected_reward),
        "rewards/accuracy": jnp.mean((chosen_reward > rejected_reward).astype(jnp.float32)),
        "logps/chosen": jnp.mean(jax.lax.stop_gradient(pi_c)),
        "logps/rejected": jnp.mean(jax.lax.stop_gradient(pi_r)),
        "logps/ref_chosen": jnp.mean(ref_c),
        "logps/ref_rejected": jnp.mean(ref_r),
    }
    return loss, metrics
