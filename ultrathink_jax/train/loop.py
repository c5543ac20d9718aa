"""The training loop: build everything from the config, resume if the workdir has a checkpoint, train, evaluate,
checkpoint, log, and print a sample at the end."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, TextIO

import jax
import ml_collections
import numpy as np
import optax

from ultrathink_jax import metrics as metrics_lib
from ultrathink_jax import sharding
from ultrathink_jax.config import ConfigError, ModelConfig
from ultrathink_jax.data import build_eval_iterator, build_tokenizer, build_train_iterator
from ultrathink_jax.moe import moe_metrics, moe_report
from ultrathink_jax.train import layerskip
from ultrathink_jax.train import run as run_lib
from ultrathink_jax.train import steps as steps_lib
from ultrathink_jax.train.config import validate
from ultrathink_jax.train.optim import make_optimizer
from ultrathink_jax.train.preemption import Preempted, StopSignals
from ultrathink_jax.train.state import TrainState, abstract_state, init_state, state_shardings
from ultrathink_jax.train.timing import Phases

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (train.max_bad_steps non-finite steps in a row); the message names the step and the
    last good checkpoint."""


@dataclasses.dataclass
class TrainResult:
    start_step: int  # the step this invocation started from (0, or the resumed checkpoint's step)
    final_step: int
    losses: dict[int, float]  # step -> training loss of that step's batch (steps run by this invocation)
    evals: dict[int, float]  # step -> held-out mean loss
    tokens: int  # target tokens trained on by this invocation
    seconds: float
    sample: str | None
    params: object = dataclasses.field(default=None, repr=False)  # the final parameters (on the mesh)
    skipped: list[int] = dataclasses.field(default_factory=list)  # steps skipped for a non-finite loss/gradient


def evaluate(eval_step, params, batches, mesh, max_batches: int = 0) -> tuple[float, float]:
    """(token-weighted mean loss, scored targets) over `batches`; sums accumulate in float64 on the host."""
    loss_sum = weight_sum = 0.0
    for i, local in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        s, w = jax.device_get(eval_step(params, steps_lib.global_batch(local, mesh)))
        loss_sum += float(s)
        weight_sum += float(w)
    return (loss_sum / weight_sum if weight_sum else float("nan")), weight_sum


def _check_batch(config: ml_collections.ConfigDict, mesh) -> None:
    rows = config.data.global_batch_size // config.train.grad_accum
    dp = sharding.data_parallel_size(mesh)
    if rows % dp:
        raise ConfigError(f"config: data.global_batch_size={config.data.global_batch_size} / train.grad_accum="
                          f"{config.train.grad_accum} = {rows} rows per micro-batch, not divisible by the "
                          f"{dp} data-parallel devices (mesh data x fsdp x expert)")


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, until_step: int | None = None,
          out: TextIO | None = None) -> TrainResult:
    """Trains to `config.train.steps` (or stops after `until_step`, checkpointing there, as a preempted job
    would), resuming from the workdir's latest checkpoint. Bad input raises ConfigError / MeshError /
    DataError / CheckpointError before anything in the workdir is overwritten."""
    out = out or sys.stderr
    is_main = jax.process_index() == 0
    validate(config)
    workdir = Path(workdir)
    mesh = run_lib.run_mesh(config)
    _check_batch(config, mesh)
    phases = Phases()
    config = run_lib.keep_workdir_tokenizer_settings(workdir, config)
    with phases.time("tokenizer"):
        tokenizer = build_tokenizer(config.data, workdir)
    model = run_lib.resolve_model_config(config, tokenizer.vocab_size)
    run_lib.check_same_shapes(workdir, model)
    with phases.time("data"):
        train_iter = build_train_iterator(config.data, tokenizer, workdir)
        eval_batches = build_eval_iterator(config.data, tokenizer, workdir=workdir)

    total = config.train.steps
    end = min(total, until_step) if until_step is not None else total
    fns = config_step_functions(config, model, mesh)
    store = run_lib.checkpoints(workdir, config)
    progress = metrics_lib.Progress(total, enabled=is_main, bar=config.log.progress, stream=out)
    writer = None
    stop = StopSignals(out).__enter__()  # from here on SIGTERM/SIGINT stop the run at a step boundary
    try:
        with sharding.activate(mesh):
            state = _restore_or_init(config, model, fns.tx, mesh, store, train_iter, progress)
            # after the restore: a workdir that cannot resume gets its one error line and nothing else
            progress.message(_describe_data("train", train_iter.stats)
                             + ("" if eval_batches is None else "; " + _describe_data("eval", eval_batches.stats)))
            # only now, with the checkpoint and data state accepted, may the run's files change
            run_lib.write_run_files(workdir, config, model)
            writer = metrics_lib.Writer(workdir / "tensorboard", enabled=is_main and config.log.tensorboard)
            result = _loop(config, model, mesh, fns, state, store, writer, progress, train_iter,
                           eval_batches, end, stop, phases)
        with phases.time("checkpoint"):
            store.wait()
        if config.train.sample_tokens:
            with phases.time("sample"):
                result.sample = sample_text(model, result.params, tokenizer, config.train, mesh)
            progress.message(f"sample:\n{result.sample}")
            writer.text(result.final_step, "sample", result.sample)
        progress.message(phases.summary())
        return result
    finally:
        stop.__exit__()
        progress.close()
        if writer is not None:
            writer.close()
        store.close()


def _describe_data(name: str, stats: dict) -> str:
    text = f"{name} data: {stats.get('tokens', 0)} tokens in {stats.get('documents', 0)} documents"
    if stats.get("streaming"):
        text += " (streamed: read so far)"
    if stats.get("invalid_utf8"):
        text += f" ({stats['invalid_utf8']} invalid UTF-8 sequences replaced with U+FFFD)"
    return text


def sample_text(model: ModelConfig, params, tokenizer, train_cfg: ml_collections.ConfigDict, mesh) -> str:
    """`train.sample_prompt` continued by up to `train.sample_tokens` tokens (stops at end-of-text)."""
    from ultrathink_jax.generate import generate

    ids = tokenizer.encode(train_cfg.sample_prompt) or [tokenizer.eos_id]  # empty prompt: a fresh document
    if len(ids) >= model.max_seq_len:
        ids = ids[-(model.max_seq_len - 1):]
    new = generate(params, model, [ids], train_cfg.sample_tokens, temperature=train_cfg.sample_temperature,
                   eos_id=tokenizer.eos_id, seed=train_cfg.seed, mesh=mesh)[0]
    return train_cfg.sample_prompt + tokenizer.decode(new, skip_special_tokens=True)


def _restore_or_init(config, model: ModelConfig, tx, mesh, store, train_iter, progress) -> TrainState:
    if store.latest_step() is None:
        return init_state(model, tx, mesh, config.train.seed)
    target = abstract_state(model, tx, mesh)
    step, params, opt_state, prog, data_state = store.restore(  # the newest intact one; damaged ones are skipped
        None, target.params, target.opt_state, {"step": target.step, "rng": target.rng})
    train_iter.set_state(data_state)
    progress.message(f"resumed from checkpoint step {step} in {store.directory}")
    return TrainState(params=params, opt_state=opt_state, step=prog["step"], rng=prog["rng"])


class StepFunctions(NamedTuple):
    tx: optax.GradientTransformation
    shardings: TrainState
    train_step: Callable  # jitted, donates the state
    eval_step: Callable  # jitted


@functools.lru_cache(maxsize=8)
def step_functions(model: ModelConfig, optim_items: tuple, total_steps: int, grad_accum: int,
                   z_loss_weight: float, mesh, layerskip_cfg=None, logits_chunk_mib: float = 0.0,
                   row_groups: int = 0) -> StepFunctions:
    """Built once per distinct setting, so a process that trains again (a resume, a test) reuses the
    compiled steps instead of tracing and compiling them anew."""
    tx, schedule = make_optimizer(ml_collections.ConfigDict(dict(optim_items)), total_steps)
    shardings = state_shardings(model, tx, mesh)
    train_step = steps_lib.jit_train_step(
        steps_lib.make_train_step(model, tx, schedule, grad_accum, z_loss_weight, layerskip_cfg, logits_chunk_mib,
                                  row_groups), shardings, mesh)
    return StepFunctions(tx, shardings, train_step, steps_lib.make_eval_step(model, shardings.params, mesh))


def config_step_functions(config: ml_collections.ConfigDict, model: ModelConfig, mesh) -> StepFunctions:
    """The optimizer and jitted steps `train` runs for `config` (the parity suite drives the same ones)."""
    return step_functions(model, tuple(sorted(config.optim.items())), config.train.steps, config.train.grad_accum,
                          config.train.z_loss_weight, mesh, layerskip.from_train_config(config.train, model.n_layers),
                          config.train.logits_chunk_mib, config.train.row_groups)


def _loop(config, model, mesh, fns: StepFunctions, state, store, writer, progress, train_iter, eval_batches,
          end, stop: StopSignals, phases: Phases | None = None) -> TrainResult:
    phases = phases or Phases()
    cfg_l = config.log
    step_fn = fns.train_step
    eval_fn = fns.eval_step if eval_batches is not None else None
    fpt = metrics_lib.flops_per_token(model, config.data.seq_len)
    peak, peak_source = metrics_lib.peak_flops_per_device(cfg_l.peak_tflops)
    peak_total = peak * mesh.size
    moe = model.n_experts > 0

    start = int(jax.device_get(state.step))
    result = TrainResult(start, start, {}, {}, 0, 0.0, None)
    last_saved = start if store.latest_step() == start else None
    t0 = time.perf_counter()
    # Metrics stay on the device until a log / eval / checkpoint step (and the first step, whose time is compile
    # time and is not counted), then every pending step's come back in one device_get.
    pending: list[tuple[int, dict]] = []
    window_start, window_tokens, window_seconds, window_steps = None, 0.0, 0.0, 0
    timed_tokens = timed_seconds = 0.0
    bad_run = 0  # consecutive skipped (non-finite) steps, counted as their metrics arrive
    moe_window = moe_total = None
    step = start

    def save():
        store.save(step, state.params, state.opt_state, {"step": state.step, "rng": state.rng},
                   train_iter.get_state())

    while step < end:
        if stop.should_stop(sync_point=step % cfg_l.every_steps == 0):
            _fetch(pending, result, progress, store)
            if last_saved != step:
                with phases.time("checkpoint"):
                    save()
            store.wait()
            raise Preempted(f"stopped by {stop.name} at step {step}; checkpoint {store.directory / str(step)}")
        with phases.time("compile" if step == start else "steps"):  # the first step of an invocation compiles
            batch = steps_lib.global_batch(next(train_iter), mesh)
            state, m = step_fn(state, batch)
        step += 1
        pending.append((step, m))
        log_now = step % cfg_l.every_steps == 0 or step == end
        eval_now = eval_fn is not None and config.eval.every_steps and step % config.eval.every_steps == 0
        save_now = step % config.checkpoint.every_steps == 0
        if not (log_now or eval_now or save_now or window_start is None):
            continue
        with phases.time("compile" if window_start is None else "steps"):  # waits for the steps dispatched
            fetched = _fetch(pending, result, progress, store)
        for s, f in fetched:
            bad_run = bad_run + 1 if f["skipped"] else 0
            if moe:  # router statistics are sums: add them up per logging window and over the run
                moe_window = f["moe"] if moe_window is None else jax.tree.map(np.add, moe_window, f["moe"])
                moe_total = f["moe"] if moe_total is None else jax.tree.map(np.add, moe_total, f["moe"])
        if window_start is not None:  # step time = data + compute; evaluation and checkpoint time is left out
            window_seconds += time.perf_counter() - window_start
            window_tokens += sum(float(f["tokens"]) for _, f in fetched if not f["skipped"])
            window_steps += len(fetched)
        if bad_run >= config.train.max_bad_steps:
            raise TrainingError(f"{bad_run} consecutive non-finite steps (the last, step {step}: loss "
                                f"{float(fetched[-1][1]['loss'])}, grad norm {float(fetched[-1][1]['grad_norm'])}) "
                                f"reached train.max_bad_steps={config.train.max_bad_steps}; {_last_good(store)}")

        if log_now:
            m = fetched[-1][1]
            loss = float(m["loss"])
            timed_tokens, timed_seconds = timed_tokens + window_tokens, timed_seconds + window_seconds
            tps = window_tokens / window_seconds if window_seconds else 0.0
            step_time = window_seconds / window_steps if window_steps else time.perf_counter() - t0
            scalars = {"train/loss": loss, "train/perplexity": math.exp(min(loss, 50.0)),
                       "train/learning_rate": float(m["learning_rate"]), "train/grad_norm": float(m["grad_norm"]),
                       "train/param_norm": float(m["param_norm"]), "perf/tokens_per_second": tps,
                       "perf/step_time_s": step_time, "perf/mfu": metrics_lib.mfu(tps, fpt, peak_total),
                       "train/skipped_steps": len(result.skipped)}
            for k in ("z_loss", "moe_loss"):
                if k in m:
                    scalars[f"train/{k}"] = float(m[k])
            if "exit_loss" in m:
                exits = layerskip.exit_scalars(m)
                scalars.update(exits)
                progress.message(f"step {step}: " + ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in exits.items()))
            if moe:
                scalars.update({k: float(v) for k, v in moe_metrics(moe_window, model).items()})
                moe_window = None
            writer.scalars(step, scalars)
            progress.update(step, loss, tps, (end - step) * step_time)
            window_tokens = window_seconds = window_steps = 0

        if eval_now and step != end:
            with phases.time("eval"):
                _run_eval(eval_fn, state.params, eval_batches, mesh, config, step, writer, progress, result)
        if save_now and step != end:
            with phases.time("checkpoint"):
                save()
            last_saved = step
        window_start = time.perf_counter()

    if eval_fn is not None and step not in result.evals:
        with phases.time("eval"):
            _run_eval(eval_fn, state.params, eval_batches, mesh, config, step, writer, progress, result)
    if last_saved != step:
        with phases.time("checkpoint"):
            save()
    result.final_step, result.seconds = step, time.perf_counter() - t0
    result.params = state.params
    tps = timed_tokens / timed_seconds if timed_seconds else 0.0
    summary = (f"done: steps {result.start_step}->{step} of {config.train.steps} in "
               f"{metrics_lib.format_duration(result.seconds)}")
    if result.losses:
        summary += (f"; {result.tokens} tokens, {metrics_lib.format_rate(tps)} tok/s, MFU "
                    f"{100 * metrics_lib.mfu(tps, fpt, peak_total):.2f}% (peak: {peak_source}); "
                    f"final train loss {result.losses[step]:.4f}")
    else:
        summary += " (nothing left to train)"
    if step in result.evals:
        summary += f"; eval loss {result.evals[step]:.4f} (perplexity {math.exp(result.evals[step]):.2f})"
    progress.message(summary + f"; checkpoint {store.directory / str(step)}")
    if moe_total is not None:
        progress.message(moe_report(moe_total, model))
    return result


def _fetch(pending: list, result: TrainResult, progress, store) -> list[tuple[int, dict]]:
    """Brings the pending steps' metrics to the host in one transfer and records them; empties `pending`. Every
    checkpoint is written after such a fetch, so a step that left non-finite parameters stops the run here, before
    they can be saved."""
    fetched = list(zip([s for s, _ in pending], jax.device_get([m for _, m in pending])))
    pending.clear()
    for s, m in fetched:
        result.losses[s] = float(m["loss"])
        if not m["skipped"]:
            if not math.isfinite(float(m["param_norm"])):  # a finite gradient's update overflowed (steps.py)
                raise TrainingError(f"step {s}: the update left non-finite parameters (param norm "
                                    f"{float(m['param_norm'])}, loss {float(m['loss'])}, grad norm "
                                    f"{float(m['grad_norm'])}, learning rate {float(m['learning_rate'])}); nothing "
                                    f"saved after it; {_last_good(store)}")
            result.tokens += int(m["tokens"])
        else:
            result.skipped.append(s)
            progress.message(f"step {s}: non-finite loss {float(m['loss'])} / grad norm {float(m['grad_norm'])} / "
                             f"param norm {float(m['param_norm'])}: update skipped ({len(result.skipped)} so far)")
    return fetched


def _last_good(store) -> str:
    """'last good checkpoint: step N in DIR' (or 'none'), once the saves in flight are done."""
    store.wait()
    good = store.latest_step()
    return f"last good checkpoint: {'none' if good is None else f'step {good}'} in {store.directory}"


def _run_eval(eval_fn, params, batches, mesh, config, step, writer, progress, result) -> None:
    loss, n = evaluate(eval_fn, params, batches, mesh, config.eval.max_batches)
    result.evals[step] = loss
    writer.scalars(step, {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": n})
    progress.message(f"eval step {step}: loss {loss:.4f} perplexity {math.exp(min(loss, 50.0)):.2f} ({int(n)} tokens)")
