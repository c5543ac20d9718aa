"""MoE speed: training (dropless vs capacity-factor dispatch vs a dense model with the same active parameters,
forward + backward of the training loss on one device), and one MoE layer's decode step (gather vs tiled)."""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ultrathink_jax.config import ModelConfig
from ultrathink_jax.losses import cross_entropy
from ultrathink_jax.model import Transformer
from ultrathink_jax.moe import inactive_expert_params, moe_loss
from ultrathink_jax.moe.dispatch import DENSE_ROWS_RATIO, GROUP_TILE
from ultrathink_jax.params import abstract_params, param_count

TITLE = "MoE: dropless vs capacity dispatch vs dense with equal active parameters (training fwd+bwd)"
DECODE_BATCHES = (1, 4, 8, 16, 64, 128, 256)
DECODE_STEPS = 64
RAGGED = "moe dropless (ragged_dot, forced)"


def _configs(quick: bool) -> tuple[dict[str, ModelConfig], int, int]:
    from ultrathink_jax.configs import moe_default

    config = moe_default.get_config()
    fields = dict(config.model)
    fields["vocab_size"] = fields["vocab_size"] or config.data.vocab_size
    batch, seq = config.data.global_batch_size, config.data.seq_len
    if quick:
        fields.update(n_layers=2, moe_first_dense=0)
        batch, seq = 4, 64
    moe = ModelConfig(**fields)
    k_ff = moe.n_experts_per_tok * moe.resolved_moe_d_ff  # a dense MLP this wide does the same per-token work
    return {
        "dense": dataclasses.replace(moe, n_experts=0, d_ff=k_ff),
        "moe dropless": moe,
        RAGGED: moe,
        f"moe capacity (factor {moe.capacity_factor})": dataclasses.replace(moe, moe_dispatch="capacity"),
    }, batch, seq


def _loss(config, params, tokens):
    segments = jnp.ones_like(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, aux, _ = Transformer(config).apply({"params": params}, tokens, positions, segments)
    ce, n = cross_entropy(logits[:, :-1], tokens[:, 1:], jnp.ones(tokens[:, 1:].shape, jnp.float32))
    loss = ce / n + (moe_loss(aux["moe"], config) if "moe" in aux else 0.0)
    dropped = jnp.sum(aux["moe"]["dropped"]) / jnp.sum(aux["moe"]["expert_counts"]) if "moe" in aux else 0.0
    return loss, dropped


def _measure(config: ModelConfig, batch: int, seq: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.02, jnp.float32),
                          nn.unbox(abstract_params(config)))
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, seq)), jnp.int32)
    step = jax.jit(jax.value_and_grad(functools.partial(_loss, config), has_aux=True))
    start = time.perf_counter()
    (_, dropped), _ = jax.block_until_ready(step(params, tokens))
    compile_s = time.perf_counter() - start
    return {"step": step, "args": (params, tokens), "compile_s": compile_s, "dropped": float(dropped)}


def _time(measured: dict) -> float:
    start = time.perf_counter()
    jax.block_until_ready(measured["step"](*measured["args"]))
    return time.perf_counter() - start


def _measure_all(configs: dict, batch: int, seq: int, repeats: int) -> dict:
    """Compiles every variant, then times them interleaved (a shared machine slows all alike); median step."""
    from ultrathink_jax.moe import dispatch

    compiled = {}
    for name, config in configs.items():
        original = dispatch.grouped_matmul_impl
        if name == RAGGED:  # what CPU would run without the tiled path: ragged_dot as XLA:CPU lowers it
            dispatch.grouped_matmul_impl = lambda *shape: "ragged_dot"
        try:
            compiled[name] = _measure(config, batch, seq, repeats)
        finally:
            dispatch.grouped_matmul_impl = original
    times = {name: [] for name in configs}
    for _ in range(repeats):
        for name, m in compiled.items():
            times[name].append(_time(m))
    out = {}
    for name, m in compiled.items():
        best = float(np.median(times[name]))
        out[name] = {"step_ms": 1e3 * best, "tokens_per_s": batch * seq / best, "compile_s": m["compile_s"],
                     "dropped": m["dropped"]}
    return out


def _decode_step_fn(config: ModelConfig, batch: int):
    """DECODE_STEPS decode steps of one MoE layer ([batch, 1, D] each), jitted as one loop. Each step feeds the
    normalised output back, so routing changes every step and nothing is loop-invariant for XLA to hoist."""
    from ultrathink_jax.moe import MoEMLP

    layer = MoEMLP(config)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 1, config.d_model)), jnp.float32)
    valid = jnp.ones((batch, 1), bool)
    shapes = nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), x, valid))
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.05, jnp.float32), shapes)

    def steps(params, x):
        def step(_, x):
            x = x + layer.apply(params, x, valid)[0]
            return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True))
        return jax.lax.fori_loop(0, DECODE_STEPS, step, x)

    return jax.jit(steps), (params, x)


DECODE_IMPLS = ("gather", "dense", "tiled")


def _decode_rows(config: ModelConfig, repeats: int, batches) -> list[str]:
    """Per batch: the layer's decode step with each CPU implementation forced, interleaved, and the rule's pick."""
    from ultrathink_jax.moe import dispatch

    rows = []
    original = dispatch.grouped_matmul_impl
    for batch in batches:
        n_assign = batch * config.n_experts_per_tok
        compiled = {}
        for impl in DECODE_IMPLS:  # read at trace time
            dispatch.grouped_matmul_impl = lambda *shape, impl=impl: impl
            try:
                fn, args = _decode_step_fn(config, batch)
                jax.block_until_ready(fn(*args))
            finally:
                dispatch.grouped_matmul_impl = original
            compiled[impl] = (fn, args)
        times = {impl: [] for impl in compiled}
        for _ in range(repeats):
            for impl, (fn, args) in compiled.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[impl].append((time.perf_counter() - start) / DECODE_STEPS)
        us = {impl: 1e6 * float(np.median(t)) for impl, t in times.items()}
        chosen = original(n_assign, config.n_experts, config.n_experts_per_tok)
        fastest = min(us, key=us.get)
        rows.append(f"| {batch} | {n_assign} | {chosen} | " + " | ".join(f"{us[i]:.0f}" for i in DECODE_IMPLS) +
                    f" | {fastest} | {us[chosen] / us[fastest]:.2f}x |")
    return rows


def run(quick: bool) -> str:
    configs, batch, seq = _configs(quick)
    repeats = 2 if quick else 9
    rows = ["| model | total params | active params | step (ms, median) | tokens/s | vs dense | vs capacity | dropped "
            "| first call (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    results = _measure_all(configs, batch, seq, repeats)
    dense_tps = results["dense"]["tokens_per_s"]
    capacity_tps = [r for n, r in results.items() if n.startswith("moe capacity")][0]["tokens_per_s"]
    for name, config in configs.items():
        r = results[name]
        rows.append(f"| {name} | {param_count(config) / 1e6:.2f}M | {(param_count(config) - inactive_expert_params(config)) / 1e6:.2f}M | "
                    f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / dense_tps:.2f}x | "
                    f"{r['tokens_per_s'] / capacity_tps:.2f}x | {100 * r['dropped']:.1f}% | {r['compile_s']:.1f} |")
    moe = configs["moe dropless"]
    what = (f"`configs/moe_default.py` ({moe.n_layers} layers, d_model {moe.d_model}, {moe.n_experts} experts top-"
            f"{moe.n_experts_per_tok}, expert width {moe.resolved_moe_d_ff}, MoE layers "
            f"{[i for i in range(moe.n_layers) if moe.is_moe_layer(i)]}); dense = the same model with each MoE "
            f"layer a dense SwiGLU of width {moe.n_experts_per_tok * moe.resolved_moe_d_ff} (equal active "
            f"parameters). Batch {batch} x {seq} tokens, float32, one device, median of {repeats} interleaved "
            f"jitted steps (forward + backward of cross-entropy + router losses) after a warm-up call; "
            f"'dropped' is the capacity mode's share of top-k assignments not computed on this random-init batch. "
            f"'moe dropless' is what runs on CPU: the tiled grouped matmul (`moe.dispatch._tiled_experts`, tiles of "
            f"{GROUP_TILE} rows, each expert's group padded to a tile multiple, one batched matmul with per-tile "
            f"expert weights gathered; rows moved by gathers both ways, forward and backward; at most "
            f"{moe.n_experts} partial tiles wasted). The forced ragged_dot row is the path "
            f"GPU/TPU take: on the CPU backend XLA lowers `jax.lax.ragged_dot` to a masked dense product over all "
            f"{moe.n_experts} experts (E x the expert FLOPs). The capacity einsums do about capacity_factor x the "
            f"useful work and drop overflow. 1-minute load average {os.getloadavg()[0]:.1f} at the end (shared "
            f"2-core machine: compare the ratios, measured in one run).")
    decode = ["| batch (1 token each) | assignments (B x k) | CPU rule picks | gather (us/step, median) | "
              "dense (us/step) | tiled (us/step) | fastest | picked / fastest |",
              "|---|---:|---|---:|---:|---:|---|---:|",
              *_decode_rows(moe, repeats, DECODE_BATCHES[:2] if quick else DECODE_BATCHES)]
    decode_what = (f"One MoE layer of the same model decoding: {DECODE_STEPS} steps of [batch, 1, {moe.d_model}] in "
                   f"one jitted loop (each step's output, normalised, is the next input, so routing changes every "
                   f"step), median of {repeats} interleaved runs, per step, each implementation forced. 'gather' "
                   f"copies each assignment's expert weights and does batched mat-vecs "
                   f"(`moe.dispatch._gathered_experts`); 'dense' runs every expert on every token and picks the "
                   f"assignments' rows (`_all_experts`, E / k = {moe.n_experts // moe.n_experts_per_tok}x the useful "
                   f"FLOPs, no weight copies); 'tiled' is the training path. `dispatch.grouped_matmul_impl` picks "
                   f"gather up to E = {moe.n_experts} assignments, then dense while it multiplies at most "
                   f"{DENSE_ROWS_RATIO}x the rows tiled does, then tiled.")
    return "\n".join(rows) + "\n\n" + what + "\n\n" + "\n".join(decode) + "\n\n" + decode_what

