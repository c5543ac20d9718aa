"""The pure, jitted training and evaluation steps.

`train_step(state, batch) -> (state, metrics)`: the batch's rows are split into `grad_accum` micro-batches and a
`lax.scan` sums (loss sum, target-weight sum, gradients) over them; the sums are divided once by the total weight,
so 4 micro-batches give exactly the gradient of one 4x batch (token-weighted mean cross-entropy). For MoE models
the router loss (`ultrathink_jax.moe.moe_loss`, a per-batch mean) is added per micro-batch weighted by the
micro-batch's target count (computed from the router statistics summed over the micro-batch's row groups), and the
layers' router statistics are summed over micro-batches. A step whose loss or gradients are not finite changes
nothing but the step counter (metrics["skipped"]).
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ultrathink_jax import losses, sharding
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.model import Transformer, head_kernel
from ultrathink_jax.moe import moe_loss, update_selection_bias
from ultrathink_jax.train import layerskip as layerskip_lib
from ultrathink_jax.train.state import TrainState, step_rng

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


CPU_LOGITS_CHUNK_MIB = 4.0  # `train.logits_chunk_mib` = 0 on CPU: chunks that stay in cache (measured: BENCHMARKS.md)


def logits_chunk_bytes(logits_chunk_mib: float) -> float:
    """`train.logits_chunk_mib` in bytes, 0 = auto: cache-sized chunks on CPU, the whole logits elsewhere."""
    if logits_chunk_mib:
        return logits_chunk_mib * 2 ** 20
    return CPU_LOGITS_CHUNK_MIB * 2 ** 20 if jax.default_backend() == "cpu" else float("inf")


def micro_batch_loss(config: ModelConfig, z_loss_weight: float, params, batch, rng, layerskip=None, step=None,
                     logits_chunk_mib: float = 0.0, with_moe_loss: bool = True):
    """(objective sum, parts): the objective is a *sum* over target tokens so micro-batches add up exactly.
    `layerskip` (a `train.layerskip.LayerSkipConfig`, None = off) adds exit losses and layer dropout. The head and
    cross-entropy run fused, in chunks of the sequence (`losses.head_cross_entropy`, `train.logits_chunk_mib`).
    `with_moe_loss=False` leaves the router losses out (parts["moe"] still has the statistics: `add_moe_loss`)."""
    extra = {} if layerskip is None else layerskip_lib.model_inputs(layerskip, config, rng, step,
                                                                   batch["inputs"].shape[0])
    hidden, aux, _ = Transformer(config).apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
        deterministic=False, rngs={"jitter": rng}, return_hidden=True, **extra)
    kernel, vocab_major = head_kernel(params, config)
    B, T, _ = hidden.shape
    chunk = losses.logits_chunk_len(B, T, config.vocab_size, logits_chunk_bytes(logits_chunk_mib))
    objective, ce_sum, z_sum, weight_sum = losses.head_cross_entropy(
        hidden, kernel, batch["targets"], batch["weights"], vocab_major=vocab_major, dtype=config.dtype,
        z_loss_weight=z_loss_weight, chunk_len=chunk)
    parts = {"ce_sum": ce_sum, "weight_sum": weight_sum}
    if z_loss_weight:
        parts["z_sum"] = z_sum
    if "moe" in aux:
        parts["moe"] = aux["moe"]
        if with_moe_loss:
            objective, parts = add_moe_loss(config, objective, parts)
    if layerskip is not None:
        objective, parts = layerskip_lib.add_exit_losses(layerskip, config, aux, batch, step, objective, parts)
    return objective, parts


def add_moe_loss(config: ModelConfig, objective, parts: dict):
    """Adds the router losses, as a sum over the batch's target tokens (the mean loss x their weight), from the
    router statistics in parts["moe"]."""
    moe_weighted = moe_loss(parts["moe"], config) * parts["weight_sum"]
    return objective + moe_weighted, {**parts, "moe_loss_sum": moe_weighted}


# `train.row_groups` = 0 on one CPU device: one group per core (independent row groups let XLA:CPU keep every core
# busy), capped here because more groups than cores only add per-op overhead. Measured on 2-core hosts only:
# BENCHMARKS.md, "Training step: where the time goes", rounds 8 and 9.
CPU_ROW_GROUPS = 4
# Dropless MoE takes two groups per core: its tiles' batched matmuls each run on one core, and XLA:CPU's executor
# orders the groups' backward tile matmuls one after another (their buffers share memory), so one group per core
# leaves a core idle; capacity MoE does not gain from it (BENCHMARKS.md, same section, round 10).
DROPLESS_GROUPS_PER_CORE = 2


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_row_groups(row_groups: int, config: ModelConfig, layerskip, rows: int) -> int:
    """`train.row_groups`, 0 = auto: one per core (two for dropless MoE) up to CPU_ROW_GROUPS (the largest divisor of
    `rows` up to that) for a model without router jitter or LayerSkip on a single CPU device, else 1. An explicit
    value must divide the micro-batch's rows."""
    if row_groups:
        if rows % row_groups:
            raise ValueError(f"train.row_groups={row_groups} must divide the micro-batch's {rows} rows")
        return row_groups
    # Groups change nothing for the loss: a sum over tokens, and the router losses are computed once from the groups'
    # summed statistics (`row_group_loss`). Random draws differ per group, so auto leaves router jitter and LayerSkip's
    # layer dropout alone.
    if config.router_jitter or layerskip is not None or jax.default_backend() != "cpu" or jax.device_count() != 1:
        return 1
    per_core = DROPLESS_GROUPS_PER_CORE if config.n_experts and config.moe_dispatch == "dropless" else 1
    return max(g for g in range(1, min(CPU_ROW_GROUPS, per_core * cpu_cores()) + 1) if rows % g == 0)


def row_group_loss(config: ModelConfig, z_loss_weight: float, params, batch, rng, layerskip, step,
                   logits_chunk_mib: float, groups: int):
    """`micro_batch_loss` summed over `groups` independent groups of the batch's rows, in one program: XLA:CPU runs
    each elementwise fusion on one thread but overlaps independent ops, so the groups keep every core busy."""
    if groups == 1:
        return micro_batch_loss(config, z_loss_weight, params, batch, rng, layerskip, step, logits_chunk_mib)
    split = split_micro_batches(batch, groups)
    sums = [micro_batch_loss(config, z_loss_weight, params, {k: v[g] for k, v in split.items()},
                             jax.random.fold_in(rng, g), layerskip, step, logits_chunk_mib, with_moe_loss=False)
            for g in range(groups)]
    objective, parts = jax.tree.map(lambda *group_parts: sum(group_parts[1:], group_parts[0]), *sums)
    # The router losses are not sums over tokens (the balance loss multiplies batch means): computed once from the
    # groups' summed statistics, they are the whole batch's, as with one group.
    return add_moe_loss(config, objective, parts) if "moe" in parts else (objective, parts)


def split_micro_batches(batch: dict, n: int) -> dict:
    """[B, T] -> [n, B/n, T]; micro-batch m takes rows m, m+n, m+2n, ... so each device's contiguous shard of
    the batch feeds every micro-batch equally and the split needs no communication."""
    def split(x):
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "act_batch") + (None,) * (x.ndim - 2))

    return {k: split(batch[k]) for k in BATCH_KEYS}


def make_train_step(config: ModelConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int, z_loss_weight: float, layerskip=None, logits_chunk_mib: float = 0.0,
                    row_groups: int = 0) -> Callable:
    """The un-jitted step function; see `jit_train_step` for the sharded, donating version."""
    def train_step(state: TrainState, batch: dict):
        groups = resolve_row_groups(row_groups, config, layerskip, batch["inputs"].shape[0] // grad_accum)
        grad_fn = jax.grad(lambda p, b, r, s: row_group_loss(config, z_loss_weight, p, b, r, layerskip, s,
                                                             logits_chunk_mib, groups), has_aux=True)
        rng = step_rng(state)
        micro = split_micro_batches(batch, grad_accum)

        def accumulate(carry, xs):
            m, micro_batch = xs
            grads, parts = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, m), state.step)
            return jax.tree.map(jnp.add, carry, (grads, parts)), None

        if grad_accum == 1:  # no loop: a length-1 scan still compiles to a while loop XLA cannot fuse across
            grad_sum, sums = grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), jax.random.fold_in(rng, 0),
                                     state.step)
        else:
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
                grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), rng, state.step))
            (grad_sum, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
        denom = jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grad_sum)
        grad_norm, learning_rate = optax.tree.norm(grads), schedule(state.step)
        # A non-finite loss or gradient (an overflowing batch, a diverging learning rate) skips the update, on the
        # device: params and optimizer state stay as they were, so nothing non-finite is ever checkpointed. Decided
        # before the update, so the update runs in place inside the `cond`: selecting between the new and the old
        # state afterwards cost a pass over params, mu and nu (BENCHMARKS.md, round 7). With a finite gradient and
        # learning rate the update is finite; `train.loop` stops if the parameters still are not.
        ok = jnp.isfinite(sums["ce_sum"]) & jnp.isfinite(grad_norm) & jnp.isfinite(learning_rate)

        def update(params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            if "moe" in sums:  # aux-loss-free balancing (a no-op unless router_bias_update_rate > 0)
                new_params = update_selection_bias(params, new_params, sums["moe"]["expert_counts"], config)
            return new_params, opt_state

        params, opt_state = jax.lax.cond(ok, update, lambda params, opt_state: (params, opt_state), state.params,
                                         state.opt_state)
        param_norm = optax.tree.norm(params)
        metrics = {
            "loss": sums["ce_sum"] / denom,  # token-weighted mean cross-entropy (the number perplexity uses)
            "grad_norm": grad_norm,  # before clipping
            "param_norm": param_norm,  # after the step (the old parameters' when it was skipped)
            "learning_rate": learning_rate,
            "tokens": sums["weight_sum"],
            "skipped": ~ok,
        }
        if "z_sum" in sums:
            metrics["z_loss"] = sums["z_sum"] / denom
        if "moe_loss_sum" in sums:
            metrics["moe_loss"] = sums["moe_loss_sum"] / denom
            metrics["moe"] = sums["moe"]  # router statistics summed over micro-batches
        if "exit_ce_sum" in sums:  # per exit layer; exit_tokens 0 = not active this step
            metrics["exit_loss"] = sums["exit_ce_sum"] / jnp.maximum(sums["exit_weight_sum"], 1.0)
            metrics["exit_tokens"] = sums["exit_weight_sum"]
            metrics["exit_layers"] = jnp.asarray(layerskip.exit_layers, jnp.int32)
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1, rng=state.rng), metrics

    return train_step


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    return {k: sharding.batch_sharding(mesh) for k in BATCH_KEYS}


def jit_train_step(step_fn: Callable, state_shardings: TrainState, mesh: Mesh) -> Callable:
    """Explicit shardings in and out; the old state's buffers are donated to the new one."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings(mesh)),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def make_eval_step(config: ModelConfig, param_shardings, mesh: Mesh) -> Callable:
    """`eval_step(params, batch) -> (loss sum, target-weight sum)`, to be summed over batches then divided once."""
    def eval_step(params, batch):
        logits, _, _ = Transformer(config).apply({"params": params}, batch["inputs"], batch["positions"],
                                                 batch["segment_ids"])
        return losses.cross_entropy(logits, batch["targets"], batch["weights"])

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(eval_step, in_shardings=(param_shardings, batch_shardings(mesh)), out_shardings=replicated)


def global_batch(local: dict, mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the mesh's data-parallel axes."""
    batch_sharding = sharding.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(batch_sharding, local[k]) for k in BATCH_KEYS}
