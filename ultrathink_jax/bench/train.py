"""Training throughput side by side: the trainer's jitted JAX step against the PyTorch twin's step, eager and under
`torch.compile`, on the same model, the same batch and the same weights (one export), in one process.

Both sides run forward + backward of the token-mean cross-entropy (+ the router loss for MoE), global-norm clipping
and AdamW. Repetitions are interleaved (JAX, eager, compiled, matmul peak, JAX, ...) and medians reported, so a
machine shared with other jobs slows all columns alike and the ratios stay meaningful.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile
import time

import jax
import numpy as np

from ultrathink_jax import metrics, sharding
from ultrathink_jax.train.config import sections
from ultrathink_jax.train.loop import step_functions
from ultrathink_jax.train.run import resolve_model_config
from ultrathink_jax.train.state import init_state
from ultrathink_jax.train.steps import global_batch

LONG_SEQ_LEN = 1024
TITLE = "Training throughput: JAX train step vs the PyTorch twin (eager and torch.compile)"


@dataclasses.dataclass
class Case:
    name: str
    config: object  # ml_collections.ConfigDict, as launch.train reads it
    twin: bool = True  # the twin implements dense and dropless MoE only (Hugging Face semantics)


def cases(quick: bool) -> list[Case]:
    from ultrathink_jax.configs import default, moe_default

    if quick:  # a smoke run: tiny shapes, every code path (dense, dropless and capacity MoE, both twins)
        def tiny(config, **model):
            config.model.update(dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, **model))
            config.data.update(dict(seq_len=16, global_batch_size=8, vocab_size=128))  # 8: the tests' devices
            return config
        moe = tiny(moe_default.get_config(), moe_first_dense=0, moe_d_ff=32)
        capacity = tiny(moe_default.get_config(), moe_first_dense=0, moe_d_ff=32, moe_dispatch="capacity")
        return [Case("tiny dense", tiny(default.get_config())), Case("tiny moe dropless", moe),
                Case("tiny moe capacity", capacity, twin=False)]

    wide = default.get_config()
    wide.model.update(dict(d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=1408))
    moe = moe_default.get_config()
    k_ff = moe.model.n_experts_per_tok * (moe.model.moe_d_ff or moe.model.d_ff)
    dense_eq = moe_default.get_config()  # each MoE MLP -> a dense SwiGLU with the same active width
    dense_eq.model.update(dict(n_experts=0, d_ff=k_ff))
    capacity = moe_default.get_config()
    capacity.model.moe_dispatch = "capacity"
    long = default.get_config()  # the same tokens per step as long rows: where attention's cost shows
    long.model.max_seq_len = LONG_SEQ_LEN
    long.data.update(dict(seq_len=LONG_SEQ_LEN, global_batch_size=long.data.global_batch_size * long.data.seq_len
                          // LONG_SEQ_LEN))
    return [Case("default (configs/default.py)", default.get_config()),
            Case("width 512 (4 layers, 8/4 heads, d_ff 1408)", wide),
            Case(f"default at seq {LONG_SEQ_LEN} ({long.data.global_batch_size} x {LONG_SEQ_LEN})", long),
            Case(f"moe_default as dense (d_ff {k_ff})", dense_eq),
            Case("moe_default dropless", moe),
            Case(f"moe_default capacity {capacity.model.capacity_factor}", capacity, twin=False)]


def synthetic_batch(rows: int, seq_len: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(rows, seq_len + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((rows, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
            "weights": np.ones((rows, seq_len), np.float32)}


class JaxStep:
    """The trainer's own jitted, donating train step (`launch.train` builds the same one)."""

    def __init__(self, config):
        self.model = resolve_model_config(config, config.data.vocab_size)
        self.mesh = sharding.make_mesh(dict(config.mesh))
        optim = sections()["optim"]
        optim.update(dict(config.optim))
        # z-loss off and no LayerSkip: the twin has neither. The CPU layout knobs are the config's, as in training.
        self.fns = step_functions(self.model, tuple(sorted(optim.items())), 1000, config.train.grad_accum, 0.0,
                                  self.mesh, None, config.train.logits_chunk_mib, config.train.row_groups)
        with sharding.activate(self.mesh):
            self.state = init_state(self.model, self.fns.tx, self.mesh, 0)
        self.params0 = jax.device_get(self.state.params)  # exported for the twin before any step
        self.loss = None

    def __call__(self, batch) -> None:
        with sharding.activate(self.mesh):
            self.state, m = self.fns.train_step(self.state, global_batch(batch, self.mesh))
            self.loss = float(jax.device_get(m["loss"]))

    def compile_seconds(self, batch) -> float:
        with sharding.activate(self.mesh):
            start = time.perf_counter()
            self.fns.train_step.lower(self.state, global_batch(batch, self.mesh)).compile()
            return time.perf_counter() - start


class TwinStep:
    """The twin's training step: CE over the same targets (+ router loss), clip_grad_norm_, the twin's AdamW."""

    def __init__(self, hf_dir, model_config, optim, compiled: bool):
        import torch
        import torch.nn.functional as F

        from ultrathink_torch import build_adamw, load_pretrained

        self.torch = torch
        model = load_pretrained(hf_dir).train()
        self.params = list(model.parameters())
        self.opt = build_adamw(model, lr=optim.learning_rate, weight_decay=optim.weight_decay,
                               betas=(optim.b1, optim.b2), eps=optim.eps)
        self.clip = optim.grad_clip
        moe = bool(model_config.n_experts)
        coef = model_config.router_aux_loss_weight

        def loss_fn(inputs, targets):  # (objective, cross-entropy): JAX reports the cross-entropy as "loss"
            out = model(inputs, output_router_logits=moe)
            ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), targets.reshape(-1))
            return (ce + coef * out.aux_loss if moe else ce), ce

        self.loss_fn = torch.compile(loss_fn) if compiled else loss_fn
        self.loss = None

    def __call__(self, batch) -> None:
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        loss, ce = self.loss_fn(torch.from_numpy(batch["inputs"]).long(), torch.from_numpy(batch["targets"]).long())
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.loss = float(ce.detach())


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(case: Case, repeats: int, warmup: int = 2, torch_compile: bool = True) -> dict:
    """Median step seconds per implementation (interleaved), first-step losses, compile time, matmul peak."""
    from ultrathink_jax.hf import export_params

    config = case.config
    jax_step = JaxStep(config)
    model = jax_step.model
    batches = [synthetic_batch(config.data.global_batch_size, config.data.seq_len, model.vocab_size, s)
               for s in range(2)]
    runners = {"jax": jax_step}
    compile_s = jax_step.compile_seconds(batches[0])
    if case.twin:
        optim = sections()["optim"]
        optim.update(dict(config.optim))
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = export_params(jax_step.params0, model, pathlib.Path(tmp) / "model")
            runners["eager"] = TwinStep(hf_dir, model, optim, compiled=False)
            if torch_compile:
                runners["compiled"] = TwinStep(hf_dir, model, optim, compiled=True)
    first_loss = {}
    for name, run in runners.items():  # the first step of each: same weights, same batch -> same loss
        run(batches[0])
        first_loss[name] = run.loss
        for i in range(1, warmup):
            run(batches[i % 2])
    peak_fn = metrics._measured_peak_flops.__wrapped__  # uncached: re-measured beside every repetition
    peaks = []
    step_s = _interleaved_medians(runners, batches, repeats, lambda: peaks.append(peak_fn(jax.devices()[0])))
    tokens = config.data.global_batch_size * config.data.seq_len
    return {"model": model, "tokens": tokens, "step_s": step_s, "first_loss": first_loss, "compile_s": compile_s,
            "peak": float(np.median(peaks)), "flops_per_token": metrics.flops_per_token(model, config.data.seq_len)}


def interleaved_jax_steps(cases_: list[Case], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median step seconds of the JAX train steps of several cases with equal batches, built in one process and
    timed interleaved: the way to compare two JAX configurations (e.g. dropless against capacity MoE), since this
    machine runs identical code 10-15% apart from one process, or minute, to the next."""
    steps = {case.name: JaxStep(case.config) for case in cases_}
    config = cases_[0].config
    vocab = next(iter(steps.values())).model.vocab_size
    batches = [synthetic_batch(config.data.global_batch_size, config.data.seq_len, vocab, s) for s in range(2)]
    for step in steps.values():
        for i in range(warmup):
            step(batches[i % 2])
    return _interleaved_medians(steps, batches, repeats)


def _interleaved_medians(runners: dict, batches: list, repeats: int, after_each=None) -> dict[str, float]:
    """Median seconds per runner over `repeats` rounds, each round one step of every runner in turn (alternating
    batches), then `after_each()`."""
    times = {name: [] for name in runners}
    for i in range(repeats):
        for name, run in runners.items():
            times[name].append(_timed(run, batches[i % 2]))
        if after_each:
            after_each()
    return {name: float(np.median(t)) for name, t in times.items()}


def run(quick: bool) -> str:
    import torch

    from ultrathink_jax.params import param_count

    torch.set_num_threads(os.cpu_count() or 1)  # XLA's CPU backend uses every core too
    load = os.getloadavg()[0]
    repeats = 2 if quick else 9
    rows = ["| case | params | implementation | step (median) | tokens/s | vs compiled twin | MFU | first-step loss |",
            "|---|---|---|---|---|---|---|---|"]
    compiles = []
    peaks = []
    all_cases = cases(quick)
    for case in all_cases:
        r = measure(case, repeats)
        peaks.append(r["peak"])
        compiles.append(f"{case.name} {r['compile_s']:.1f} s")
        ref = r["step_s"].get("compiled")
        for name, label in (("jax", "JAX train step"), ("eager", "twin eager"), ("compiled", "twin torch.compile")):
            if name not in r["step_s"]:
                continue
            s = r["step_s"][name]
            tps = r["tokens"] / s
            ratio = f"{ref / s:.2f}x" if ref else "n/a (no twin)"
            rows.append(f"| {case.name} | {param_count(r['model']) / 1e6:.2f}M | {label} | {1e3 * s:.0f} ms | "
                        f"{tps:,.0f} | {ratio} | {100 * metrics.mfu(tps, r['flops_per_token'], r['peak']):.1f}% | "
                        f"{r['first_loss'][name]:.4f} |")
    # The table's MoE rows are separate measurements (the dropless one interleaved with twin steps): the
    # dropless-against-capacity ratio is measured on its own, the two JAX steps interleaved.
    dropless, capacity = (next(c for c in all_cases if mode in c.name) for mode in ("dropless", "capacity"))
    pair = interleaved_jax_steps([dropless, capacity], repeats)
    end_load = os.getloadavg()[0]
    notes = (f"\n\nDropless against capacity MoE, the two JAX train steps built in one process and interleaved: "
             f"{1e3 * pair[dropless.name]:.0f} against {1e3 * pair[capacity.name]:.0f} ms, dropless at "
             f"**{pair[capacity.name] / pair[dropless.name]:.2f}x** the capacity mode's tokens/s, dropping nothing."
             f"\n\nfloat32, one device, AdamW with global-norm clipping (the trainer's optim defaults), synthetic "
             f"uniform tokens, batch x seq_len of each config (16 x 128; the seq-{LONG_SEQ_LEN} case has the same "
             f"tokens per step in longer rows). Median of {repeats} interleaved steps per "
             f"implementation after 2 warm-up steps; 'vs compiled twin' = twin torch.compile step time / this step "
             f"time (>1 = faster than the compiled twin). First-step loss: each implementation's first step on "
             f"the same batch from the same exported weights (equal losses = the same computation). MFU = tokens/s"
             f" x `metrics.flops_per_token` / the float32 1024^3 matmul rate measured beside each repetition "
             f"(median {np.median(peaks) / 1e9:.0f} GFLOP/s). torch.set_num_threads({os.cpu_count()}). JAX "
             f"compile of the train step (lower + compile, not cached): {'; '.join(compiles)}. 1-minute load "
             f"average {load:.1f} at the start, {end_load:.1f} at the end (the 2-core machine was shared: absolute "
             f"numbers are low and noisy, the ratios measured in one run are the result).")
    return "\n".join(rows) + notes
