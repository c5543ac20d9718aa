"""Adaptive depth: plain greedy vs CALM early exit vs self-speculative decoding, on two small models trained on
tiny Shakespeare for the same steps, one with the LayerSkip loss (exits at every layer, rotating, layer dropout)
and one without. Also the LayerSkip step's cost. Needs the shared data folder (../shared/data)."""

from __future__ import annotations

import os
import pathlib
import tempfile
import time

import jax
import numpy as np

TITLE = "Adaptive depth: early exit and self-speculative decoding (with and without LayerSkip training)"
REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 0.9)
MEASURES = ("max_prob", "margin")
SPECULATIVE = ((1, 2), (1, 4), (1, 6), (2, 4), (3, 4))  # (draft layers, k)


def _config(train_file, eval_file, steps: int, layerskip: bool):
    from ultrathink_jax.configs import base

    config = base.get_config()
    config.model.update(vocab_size=0, d_model=128, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=256,
                        tie_embeddings=True)
    config.data.update(train_files=str(train_file), eval_files=str(eval_file), txt_split="paragraph",
                       vocab_size=512, seq_len=128, global_batch_size=16, read_threads=1)
    config.train.update(steps=steps, sample_tokens=0)
    config.optim.update(learning_rate=3e-3, warmup_steps=min(20, steps // 4))  # quick runs: warmup < steps
    config.checkpoint.every_steps = steps
    config.eval.every_steps = 0
    config.log.update(every_steps=50, progress=False, peak_tflops=1.0, tensorboard=False)
    if layerskip:
        config.train.update(early_exit_layers=",".join(map(str, range(5))), early_exit_schedule="rotate",
                            early_exit_scale=1.0, layer_dropout_max=0.1)
    return config


def _decode_timer(prefill, decode):
    """A () -> (tokens, stats, decode seconds) for one decoder: the prefill runs untimed, then the decode loop (the
    prefill's first token is not counted; every later one is)."""
    from ultrathink_jax.generate import Engine

    def timed():
        run = prefill()
        jax.block_until_ready(run.state)
        start = time.perf_counter()
        run, stats = decode(run)
        jax.block_until_ready(run.state)
        return Engine.tokens(run), stats, time.perf_counter() - start

    return timed


def _interleaved(decoders: dict, repeats: int) -> dict:
    """{name: (tokens, stats, median decode tokens/s, median ratio to "plain")}: after a warm-up, each repeat runs
    every decoder once, back to back, so a load swing on the shared machine hits a repeat's decoders alike."""
    for fn in decoders.values():
        fn()
    rates = {name: [] for name in decoders}
    last = {}
    for _ in range(repeats):
        for name, fn in decoders.items():
            tokens, stats, seconds = fn()
            rates[name].append(sum(len(t) - 1 for t in tokens) / seconds)
            last[name] = (tokens, stats)
    plain = np.asarray(rates["plain"])
    return {name: (*last[name], float(np.median(r)), float(np.median(np.asarray(r) / plain)))
            for name, r in rates.items()}


def _step_cost(model, layerskip_cfg, steps: int) -> float:
    """Median step time with LayerSkip / without, alternating the two steps so load affects both alike."""
    from ultrathink_jax import sharding
    from ultrathink_jax.bench.train import synthetic_batch
    from ultrathink_jax.train.config import sections
    from ultrathink_jax.train.loop import step_functions
    from ultrathink_jax.train.state import init_state
    from ultrathink_jax.train.steps import global_batch

    mesh = sharding.make_mesh({}, jax.devices()[:1])
    optim = tuple(sorted(sections()["optim"].items()))
    fns = {k: step_functions(model, optim, 1000, 1, 0.0, mesh, ls) for k, ls in (("off", None), ("on", layerskip_cfg))}
    batch = synthetic_batch(16, 128, model.vocab_size, 0)
    times = {"off": [], "on": []}
    with sharding.activate(mesh):
        states = {k: init_state(model, f.tx, mesh, 0) for k, f in fns.items()}
        for i in range(steps + 1):
            for k, f in fns.items():
                start = time.perf_counter()
                states[k], m = f.train_step(states[k], global_batch(batch, mesh))
                jax.block_until_ready(m)
                if i:
                    times[k].append(time.perf_counter() - start)
    return float(np.median(times["on"]) / np.median(times["off"]))


def run(quick: bool) -> str:
    from ultrathink_jax.data import load_tokenizer
    from ultrathink_jax.generate import Engine
    from ultrathink_jax.generate.early_exit import EarlyExitConfig, EarlyExitEngine, calibrate, evaluate
    from ultrathink_jax.generate.speculative import SpeculativeConfig, SpeculativeEngine
    from ultrathink_jax.train import layerskip, train
    from ultrathink_jax.train.run import resolve_model_config

    if not DATA.is_file():
        raise FileNotFoundError(f"{DATA} is missing (the adaptive benchmark trains on tiny Shakespeare)")
    load = os.getloadavg()[0]
    steps, repeats, n_new, rows = (20, 1, 32, 8) if quick else (300, 7, 128, 32)
    text = DATA.read_text()
    cut = int(len(text) * 0.9)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "train.txt").write_text(text[:cut])
        (tmp / "eval.txt").write_text(text[cut:])
        results = {}
        for name, ls in (("plain", False), ("LayerSkip", True)):
            config = _config(tmp / "train.txt", tmp / "eval.txt", steps, ls)
            result = train(config, tmp / name)
            results[name] = (config, result, load_tokenizer(str(tmp / name / "tokenizer")))

        config, _, tokenizer = results["plain"]
        model = resolve_model_config(config, tokenizer.vocab_size)
        ids = tokenizer.encode(text[cut:cut + 200_000])
        held_out = np.asarray(ids[:rows * (64 if quick else 128)], np.int32).reshape(rows, -1)
        calibration, report = held_out[:rows // 2], held_out[rows // 2:]  # threshold chosen on one half, shown on the other
        prompt = [ids[-64:]]  # batch 1
        ls_cfg = layerskip.from_train_config(results["LayerSkip"][0].train, model.n_layers)
        cost = _step_cost(model, ls_cfg, 3 if quick else 10)

        lines += [f"Load average at start: {load:.1f} on a 2-core machine shared with other jobs: every speed below is "
                  f"a median over {repeats} repeats of ratios of runs made back to back in this one process.", "",
                  f"Models: {model.n_layers} layers, d_model {model.d_model}, vocab {model.vocab_size} (byte-level BPE "
                  f"trained on the corpus), {steps} steps of 16 x 128 tokens each on 90% of tiny Shakespeare; the "
                  f"LayerSkip model adds exit losses at layers 0-4 (rotating, scale 1) and layer dropout p_max 0.1. "
                  f"Held-out: {held_out.shape[0]} rows x {held_out.shape[1]} tokens of the other 10% (half to "
                  f"calibrate the early-exit threshold, half reported). Decoding: batch 1, a 64-token prompt, {n_new} "
                  f"new tokens, greedy; decode tokens/s exclude the prefill.", "",
                  f"LayerSkip step time (rotate: one exit head per step, + layer dropout): **{cost:.3f}x** the plain "
                  f"step (goal <= 1.10x).", ""]
        speed_rows = ["| model | held-out ppl | decoder | decode tokens/s | vs plain | acceptance | tokens/round | "
                      "round cost (plain steps) | output = plain greedy |", "|---|---|---|---|---|---|---|---|---|"]
        ee_rows = ["| model | measure | threshold | mean exit depth | layer FLOPs saved | head-check overhead | "
                   "held-out ppl | ppl change | greedy agreement |", "|---|---|---|---|---|---|---|---|---|"]
        chosen_rows = []
        for name, (_, result, _) in results.items():
            engine = Engine(result.params, model)
            decoders = {"plain": _decode_timer(lambda: engine.prefill(prompt, n_new),
                                               lambda r: (engine.decode(r), None))}
            specs = {(l, k): SpeculativeEngine(engine, SpeculativeConfig(l, k)) for l, k in SPECULATIVE}
            for (l, k), spec in specs.items():
                decoders[f"speculative, draft {l} layers, k={k}"] = _decode_timer(
                    lambda spec=spec: spec.prefill(prompt, n_new), spec.decode)
            for measure in MEASURES:
                chosen, _ = calibrate(engine.params, model, calibration, 0.02, measure, thresholds=THRESHOLDS)
                for t in THRESHOLDS:
                    r = evaluate(engine.params, model, report, EarlyExitConfig(t, measure))
                    mark = " (calibrated)" if t == chosen else ""
                    ee_rows.append(f"| {name} | {measure} | {t}{mark} | {r.mean_depth:.2f} / {model.n_layers} | "
                                   f"{r.layer_flops_saved:.1%} | {r.head_overhead:.1%} | {r.perplexity:.2f} | "
                                   f"{100 * r.perplexity_increase:+.2f}% | {r.greedy_agreement:.1%} |")
                    full_ppl = r.full_perplexity
                if chosen is not None:
                    ee = EarlyExitEngine(engine, EarlyExitConfig(chosen, measure))
                    decoders[f"early exit, {measure} >= {chosen}"] = _decode_timer(
                        lambda: engine.prefill(prompt, n_new), ee.decode)
                else:
                    chosen_rows.append(f"{name}, {measure}: no threshold keeps the perplexity increase <= 2% on the "
                                       "calibration rows.")
            timed = _interleaved(decoders, repeats)
            plain = timed["plain"][0]
            for decoder, (tokens, stats, tps, ratio) in timed.items():
                first = f"| {name} | {full_ppl:.2f} " if decoder == "plain" else "| | "
                same = "yes" if tokens == plain else "no"
                if decoder.startswith("speculative"):
                    extra = (f"{stats.acceptance_rate:.1%} | {stats.tokens_per_round:.2f} | "
                             f"{stats.tokens_per_round / ratio:.2f}")
                elif decoder.startswith("early exit"):
                    extra, same = f"depth {stats.mean_depth:.2f} | | ", same + (" (lossy)" if same == "no" else "")
                else:
                    extra = " | | "
                speed_rows.append(f"{first}| {decoder} | {tps:.1f} | {ratio:.2f}x | {extra} | {same} |")
        lines += ["Decoding speed (batch 1; round cost = tokens per round / speedup, in plain decode steps):", ""] + \
            speed_rows + ["", "Early exit (CALM) on the reported held-out rows, teacher-forced through the early-exit "
                          "decode step (copied KV states included); the calibrated threshold is the lowest with <= 2% "
                          "perplexity increase on the other (calibration) rows. Layer FLOPs saved counts the k/v "
                          "projections a skipped layer still pays; the head-check overhead is the extra head matmuls of "
                          "the confidence tests, relative to the layers' FLOPs:", ""] + ee_rows + \
            ([""] + chosen_rows if chosen_rows else [])
    return "\n".join(lines)
