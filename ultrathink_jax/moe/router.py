"""Top-k router with Mixtral's semantics, and the router's auxiliary losses.

Mixtral / Qwen2-MoE (transformers): logits = x @ W_gate^T, softmax over ALL experts in float32, top-k of the
probabilities, then (Mixtral always, Qwen2-MoE iff `norm_topk_prob`) renormalise the k weights to sum to 1.
Everything here is float32 whatever the compute dtype, so the exported model routes identically.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    logits: jax.Array  # [..., E] float32
    probs: jax.Array  # [..., E] float32, softmax over all experts
    expert_index: jax.Array  # [..., k] int32, descending probability
    expert_weight: jax.Array  # [..., k] float32, combine weights


def route(logits: jax.Array, k: int, norm_topk_prob: bool = True, selection_bias: jax.Array | None = None) -> Routing:
    """`selection_bias` [E] (aux-loss-free balancing): added to the probabilities to CHOOSE the k experts only; the
    combine weights are the chosen experts' unbiased probabilities, and no gradient reaches the bias."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    if selection_bias is None:
        weight, index = jax.lax.top_k(probs, k)
    else:
        _, index = jax.lax.top_k(probs + jax.lax.stop_gradient(selection_bias.astype(jnp.float32)), k)
        weight = jnp.take_along_axis(probs, index, axis=-1)
    if norm_topk_prob:
        weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
    return Routing(logits, probs, index.astype(jnp.int32), weight)


def expert_counts(expert_index: jax.Array, valid: jax.Array, n_experts: int) -> jax.Array:
    """[E] float32: number of top-k assignments per expert over valid tokens (before any dropping)."""
    onehot = jax.nn.one_hot(expert_index, n_experts, dtype=jnp.float32)  # [..., k, E]
    return jnp.einsum("...ke,...->e", onehot, valid.astype(jnp.float32))


def router_prob_sum(probs: jax.Array, valid: jax.Array) -> jax.Array:
    """[E] float32: sum of router probabilities over valid tokens."""
    return jnp.einsum("...e,...->e", probs, valid.astype(jnp.float32))


def load_balance_loss(counts: jax.Array, prob_sum: jax.Array, n_valid: jax.Array) -> jax.Array:
    """Switch load-balance loss E * sum_e f_e * P_e, exactly as transformers' `load_balancing_loss_func`:
    f_e = top-k assignments to e / tokens (so sum_e f_e = k and a perfectly balanced router scores k),
    P_e = mean router probability of e. Gradient flows through P only (f comes from a top-k).

    Pass counts / prob_sum / n_valid summed over layers to get transformers' multi-layer value, which pools
    the statistics of all layers before multiplying (it is not the mean of the per-layer losses)."""
    n = jnp.maximum(n_valid, 1.0)  # an all-padding batch contributes 0, not NaN
    return counts.shape[-1] * jnp.sum((counts / n) * (prob_sum / n), axis=-1)


def z_loss(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over valid tokens of logsumexp(logits)^2."""
    validf = valid.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.square(lse) * validf) / jnp.maximum(jnp.sum(validf), 1.0)


def entropy_sum(probs: jax.Array, valid: jax.Array) -> jax.Array:
    """Sum over valid tokens of the per-token router entropy, in nats (0 * log 0 counts as 0)."""
    plogp = jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0)
    return -jnp.sum(jnp.sum(plogp, axis=-1) * valid.astype(jnp.float32))


def pooled_load_balance_loss(aux_moe: dict) -> jax.Array:
    """The load-balance loss of a whole model from its MoE layers' aux stacked on a leading layer axis: pools
    the layers' statistics before multiplying, exactly as transformers' `load_balancing_loss_func` does
    (so it equals Mixtral's / Qwen2-MoE's `aux_loss`; it is not the mean of the per-layer losses)."""
    return load_balance_loss(jnp.sum(aux_moe["expert_counts"], axis=0), jnp.sum(aux_moe["router_prob_sum"], axis=0),
                             jnp.sum(aux_moe["n_valid"]))


def pooled_z_loss(aux_moe: dict) -> jax.Array:
    """Router z-loss over all MoE layers: mean over layers and valid tokens of logsumexp(logits)^2."""
    return jnp.sum(aux_moe["z_loss_sum"]) / jnp.maximum(jnp.sum(aux_moe["n_valid"]), 1.0)


def moe_loss(aux_moe: dict, config) -> jax.Array:
    """What the trainer adds to the LM loss: router_aux_loss_weight * load-balance loss (pooled over layers as
    transformers does, or the per-layer mean with `router_aux_loss_per_layer`) + router_z_loss_weight * z-loss.
    `aux_moe` is the model's aux["moe"] for ONE (micro-)batch, or its sums over parts of one batch: only the sums
    are read, so the parts' summed statistics give the whole batch's loss (`train.steps.row_group_loss`)."""
    balance = (jnp.mean(load_balance_loss(aux_moe["expert_counts"], aux_moe["router_prob_sum"],
                                          aux_moe["n_valid"][..., None]))
               if config.router_aux_loss_per_layer else pooled_load_balance_loss(aux_moe))
    return config.router_aux_loss_weight * balance + config.router_z_loss_weight * pooled_z_loss(aux_moe)


SELECTION_BIAS = "selection_bias"  # the MoEMLP parameter name (its gradient is always zero)


def selection_bias_path(config) -> tuple[str, ...]:
    """Where the stacked [n_moe_layers, E] selection bias lives in the params (every MoE layer is the last block
    of a `moe_units` unit, see model.layer_plan), in the same layer order as aux["moe"]."""
    return ("moe_units", f"block_{config.moe_every - 1}", "moe", SELECTION_BIAS)


def update_selection_bias(old_params, new_params, expert_counts: jax.Array, config):
    """DeepSeek-V3's bias update after an optimizer step: b_e <- b_e + rate * sign(mean_e load - load_e) per layer,
    from the step's top-k counts [n_moe_layers, E]. Starts from the OLD bias, so the optimizer (zero gradient,
    weight decay) never moves it. Returns `new_params` with the bias replaced; unchanged when the rate is 0."""
    rate = config.router_bias_update_rate
    if not rate:
        return new_params
    path = selection_bias_path(config)
    old = old_params
    for key in path:
        old = old[key]
    error = jnp.mean(expert_counts, axis=-1, keepdims=True) - expert_counts
    bias = old + rate * jnp.sign(error).astype(old.dtype)

    def replace(tree, keys):
        return {**tree, keys[0]: bias if len(keys) == 1 else replace(tree[keys[0]], keys[1:])}

    return replace(new_params, path)
