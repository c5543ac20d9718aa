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
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.7, 0.9)


def _config(train_file, eval_file, steps: int, layerskip: bool):
    from ultrathink_jax.configs import base

    config = base.get_config()
    config.model.update(vocab_size=0, d_model=128, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=256,
                        tie_embeddings=True)
    config.data.update(train_files=str(train_file), eval_files=str(eval_file), txt_split="paragraph",
                       vocab_size=512, seq_len=128, global_batch_size=16, read_threads=1)
    config.train.update(steps=steps, sample_tokens=0)
    config.optim.update(learning_rate=3e-3, warmup_steps=20)
    config.checkpoint.every_steps = steps
    config.eval.every_steps = 0
    config.log.update(every_steps=50, progress=False, peak_tflops=1.0, tensorboard=False)
    if layerskip:
        config.train.update(early_exit_layers=",".join(map(str, range(5))), early_exit_schedule="rotate",
                            early_exit_scale=1.0, layer_dropout_max=0.1)
    return config


def _decode_rate(fn, repeats: int):
    """(tokens, tokens/s of the fastest of `repeats` runs after a warm-up; prefill included in each)."""
    tokens = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return tokens, sum(map(len, tokens[0] if isinstance(tokens, tuple) else tokens)) / min(times)


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
    from ultrathink_jax.generate.early_exit import EarlyExitConfig, EarlyExitEngine, calibrate
    from ultrathink_jax.generate.speculative import SpeculativeConfig, SpeculativeEngine
    from ultrathink_jax.train import layerskip, train

    if not DATA.is_file():
        raise FileNotFoundError(f"{DATA} is missing (the adaptive benchmark trains on tiny Shakespeare)")
    load = os.getloadavg()[0]
    steps, repeats, n_new = (20, 1, 32) if quick else (300, 3, 128)
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
            start = time.perf_counter()
            result = train(config, tmp / name)
            train_s = time.perf_counter() - start
            tokenizer = load_tokenizer(str(tmp / name / "tokenizer"))
            results[name] = (config, result, train_s, tokenizer)

        config, _, _, tokenizer = results["plain"]
        from ultrathink_jax.train.run import resolve_model_config

        model = resolve_model_config(config, tokenizer.vocab_size)
        ids = tokenizer.encode(text[cut:cut + 200_000])
        held_out = np.asarray(ids[:16 * (64 if quick else 128)], np.int32).reshape(16, -1)
        prompt = [ids[-64:]]  # batch 1
        ls_cfg = layerskip.from_train_config(results["LayerSkip"][0].train, model.n_layers)
        cost = _step_cost(model, ls_cfg, 3 if quick else 10)

        lines += [f"Load average at start: {load:.1f} on a 2-core machine shared with other jobs: every speed below is "
                  "a ratio of runs made in this one process, back to back.", "",
                  f"Models: {model.n_layers} layers, d_model {model.d_model}, vocab {model.vocab_size} (byte-level BPE "
                  f"trained on the corpus), {steps} steps of 16 x 128 tokens each on 90% of tiny Shakespeare; the "
                  f"LayerSkip model adds exit losses at layers 0-4 (rotating, scale 1) and layer dropout p_max 0.1. "
                  f"Held-out: {held_out.shape[0]} rows x {held_out.shape[1]} tokens of the other 10%. Decoding: "
                  f"batch 1, a 64-token prompt, {n_new} new tokens, greedy; tokens/s include the prefill (best of "
                  f"{repeats}).", "",
                  f"LayerSkip step time (rotate: one exit head per step, + layer dropout): **{cost:.3f}x** the plain "
                  f"step (goal <= 1.10x).", ""]
        speed_rows = ["| model | held-out ppl | decoder | tokens/s | vs plain | acceptance | tokens/verify | "
                      "output = plain greedy |", "|---|---|---|---|---|---|---|---|"]
        ee_rows = ["| model | threshold | mean exit depth | layer FLOPs saved | head-check overhead | held-out ppl | "
                   "ppl change | greedy agreement |", "|---|---|---|---|---|---|---|---|"]
        for name, (config, result, train_s, _) in results.items():
            engine = Engine(result.params, model)
            plain, plain_tps = _decode_rate(lambda: engine.generate(prompt, n_new), repeats)
            chosen, table = calibrate(engine.params, model, held_out, 0.02, thresholds=THRESHOLDS)
            full_ppl = table[0].full_perplexity
            speed_rows.append(f"| {name} | {full_ppl:.2f} | plain greedy | {plain_tps:.1f} | 1.00x | | | |")
            for l in (1, 2, 3):
                spec = SpeculativeEngine(engine, SpeculativeConfig(l, 4))
                (toks, st), tps = _decode_rate(lambda: spec.generate(prompt, n_new), repeats)
                speed_rows.append(f"| {name} | | speculative, draft {l} layers, k=4 | {tps:.1f} | "
                                  f"{tps / plain_tps:.2f}x | {st.acceptance_rate:.1%} | {st.tokens_per_round:.2f} | "
                                  f"{'yes' if toks == plain else 'NO'} |")
            for r in table:
                mark = " (calibrated)" if r.threshold == chosen else ""
                ee_rows.append(f"| {name} | {r.threshold}{mark} | {r.mean_depth:.2f} / {model.n_layers} | "
                               f"{r.layer_flops_saved:.1%} | {r.head_overhead:.1%} | {r.perplexity:.2f} | "
                               f"{100 * r.perplexity_increase:+.2f}% | {r.greedy_agreement:.1%} |")
            if chosen is not None:
                ee = EarlyExitEngine(engine, EarlyExitConfig(chosen))
                (toks, st), tps = _decode_rate(lambda: ee.generate(prompt, n_new), repeats)
                speed_rows.append(f"| {name} | | early exit, threshold {chosen} | {tps:.1f} | {tps / plain_tps:.2f}x "
                                  f"| depth {st.mean_depth:.2f} | | {'yes' if toks == plain else 'no (lossy)'} |")
        lines += ["Decoding speed (batch 1):", ""] + speed_rows + ["", "Early exit (CALM, max-prob confidence) on "
                  "the held-out rows, teacher-forced through the early-exit decode step (copied KV states "
                  "included); the calibrated threshold is the lowest with <= 2% perplexity increase. Layer FLOPs "
                  "saved counts the k/v projections a skipped layer still pays; the head-check overhead is the "
                  "extra head matmuls of the confidence tests, relative to the layers' FLOPs:", ""] + ee_rows
    return "\n".join(lines)
