"""Training throughput: tokens/s, step time and MFU of full training steps (forward, backward, AdamW) on
synthetic token batches, through the same jitted step as `launch.train`."""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from ultrathink_jax import metrics, sharding
from ultrathink_jax.train.config import sections
from ultrathink_jax.train.loop import step_functions
from ultrathink_jax.train.run import resolve_model_config
from ultrathink_jax.train.state import init_state
from ultrathink_jax.train.steps import global_batch

TITLE = "Training throughput (launch.train step)"


def _cases():
    from configs import default

    base = default.get_config()
    bigger = default.get_config()
    bigger.model.update(dict(d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, d_ff=1024))
    bigger.data.seq_len = 256
    return [("default (configs/default.py)", base), ("6 layers x d_model 384", bigger)]


def _batch(rows: int, seq_len: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(rows, seq_len + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((rows, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
            "weights": np.ones((rows, seq_len), np.float32)}


def measure(config, steps: int) -> dict:
    model = resolve_model_config(config, config.data.vocab_size)
    mesh = sharding.make_mesh(dict(config.mesh))
    optim = sections()["optim"]
    optim.update(dict(config.optim))
    fns = step_functions(model, tuple(sorted(optim.items())), 1000, config.train.grad_accum, 0.0, mesh)
    batches = [_batch(config.data.global_batch_size, config.data.seq_len, model.vocab_size, s) for s in range(2)]
    with sharding.activate(mesh):
        state = init_state(model, fns.tx, mesh, 0)
        start = time.perf_counter()
        state, m = fns.train_step(state, global_batch(batches[0], mesh))
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - start
        times = []
        for i in range(steps):
            start = time.perf_counter()
            state, m = fns.train_step(state, global_batch(batches[i % 2], mesh))
            jax.block_until_ready(m)
            times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    tokens = config.data.global_batch_size * config.data.seq_len
    fpt = metrics.flops_per_token(model, config.data.seq_len)
    peak, source = metrics.peak_flops_per_device(config.log.peak_tflops)
    tps = tokens / step_s
    return {"model": model, "tokens_per_step": tokens, "step_s": step_s, "tokens_per_s": tps,
            "mfu": metrics.mfu(tps, fpt, peak * mesh.size), "gflops_per_token": fpt / 1e9, "compile_s": compile_s,
            "peak": f"{peak / 1e9:.0f} GFLOP/s/device ({source})", "devices": mesh.size}


def run(quick: bool) -> str:
    load = os.getloadavg()[0]  # the CPU is shared: a busy machine slows every number below
    steps = 2 if quick else 8
    rows = ["| model | params | tokens/step | step time (median) | tokens/s | GFLOP/token | MFU "
            "| first step (compile) |",
            "|---|---|---|---|---|---|---|---|"]
    peaks = set()  # one measured peak per process (metrics caches it), so the rows share a reference
    from ultrathink_jax.params import param_count

    for name, config in _cases():
        r = measure(config, steps)
        peaks.add(r["peak"])
        rows.append(f"| {name} | {param_count(r['model']) / 1e6:.1f}M | {r['tokens_per_step']} | "
                    f"{1000 * r['step_s']:.0f} ms | {r['tokens_per_s']:,.0f} | {r['gflops_per_token']:.4f} | "
                    f"{100 * r['mfu']:.1f}% | {r['compile_s']:.1f} s |")
    notes = (f"\n\nMedian of {steps} steps after the first; float32 compute, batch 16 x seq_len (the default "
             f"config's), AdamW, {r['devices']} device(s); 1-minute load average {load:.1f} when the benchmark "
             "started. MFU = tokens/s x FLOPs/token "
             "(`ultrathink_jax.metrics.flops_per_token`: 6 x matmul weights + 12 x layers x heads x head_dim x "
             f"context) / peak, with peak = {', '.join(sorted(peaks))}: on CPU there is no data-sheet peak, so it "
             "is a measured 1024^3 float32 matmul, and MFU here means 'fraction of what this CPU does on one big "
             "matmul'. No GPU was available, so the original's A100 figure (28K tokens/s for the 350M model, "
             "`configs/benchmark.py`) is not reproduced here.")
    return "\n".join(rows) + notes
