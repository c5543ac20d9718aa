"""Adaptive depth: plain greedy vs CALM early exit vs self-speculative decoding, on two small models trained on
tiny Shakespeare for the same steps, one with the LayerSkip loss (exits at every layer, rotating, layer dropout)
and one without. Also the LayerSkip step's cost. Needs the corpus (`input.txt` of karpathy/char-rnn's
data/tinyshakespeare, not shipped: 1.1 MB) named by $ULTRATHINK_TINYSHAKESPEARE.

Early exit is scored honestly: every (measure, candidate layers) setting gets its threshold from the calibration
half of the held-out rows, the setting with the largest calibration-half net saving is chosen there too, and only
the other half's numbers are reported against the goal."""

from __future__ import annotations

import os
import pathlib
import tempfile
import time

import jax
import numpy as np

TITLE = "Adaptive depth: early exit and self-speculative decoding (with and without LayerSkip training)"
DATA_ENV = "ULTRATHINK_TINYSHAKESPEARE"
N_LAYERS = 8
EXIT_SCALE = 2.0  # LayerSkip exit-loss scale (exit l weighs scale * (l + 1) / n_layers)
THRESHOLDS = {"max_prob": (0.1, 0.2, 0.3, 0.5, 0.7, 0.9),
              "saturation": (0.9, 0.97, 0.99, 0.995, 0.998, 0.999, 0.9995)}
# candidate exit layers: every layer before the last, or every other one (half the checks)
EXIT_SETS = {"all": (), "odd": tuple(range(1, N_LAYERS - 1, 2))}
STEPS = 400
SPECULATIVE = ((1, 2), (1, 4), (2, 4), (3, 4))  # (draft layers, k)


def _config(train_file, eval_file, steps: int, layerskip: bool):
    from ultrathink_jax.configs import base

    config = base.get_config()
    config.model.update(vocab_size=0, d_model=128, n_layers=N_LAYERS, n_heads=4, n_kv_heads=2, d_ff=384,
                        max_seq_len=256, tie_embeddings=True)
    config.data.update(train_files=str(train_file), eval_files=str(eval_file), txt_split="paragraph",
                       vocab_size=512, seq_len=128, global_batch_size=16, read_threads=1)
    config.train.update(steps=steps, sample_tokens=0)
    config.optim.update(learning_rate=3e-3, warmup_steps=min(20, steps // 4))  # quick runs: warmup < steps
    config.checkpoint.every_steps = steps
    config.eval.every_steps = 0
    config.log.update(every_steps=50, progress=False, peak_tflops=1.0, tensorboard=False)
    if layerskip:
        config.train.update(early_exit_layers=",".join(map(str, range(N_LAYERS - 1))), early_exit_schedule="rotate",
                            early_exit_scale=EXIT_SCALE, layer_dropout_max=0.1)
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


def _exit_settings(quick: bool):
    """(measure, candidate-set name, layers, thresholds) of every early-exit setting the benchmark scores."""
    return [(m, name, layers, THRESHOLDS[m][::3] if quick else THRESHOLDS[m])
            for m in THRESHOLDS for name, layers in EXIT_SETS.items()]


def _early_exit(params, model, calibration, report, quick: bool):
    """(table rows, {setting: chosen threshold}, the setting chosen on the calibration half, its reported result)."""
    from ultrathink_jax.generate import layerwise
    from ultrathink_jax.generate.early_exit import EarlyExitConfig, calibrate, evaluate

    per_layer = layerwise.unstack_layers(params, model)
    rows, chosen, best, reported = [], {}, None, {}
    for measure, set_name, layers, thresholds in _exit_settings(quick):
        threshold, cal = calibrate(params, model, calibration, 0.02, measure, layers, thresholds)
        chosen[(measure, set_name)] = threshold
        if threshold is not None:
            cal_net = next(r.net_flops_saved for r in cal if r.threshold == threshold)
            if best is None or cal_net > best[0]:
                best = (cal_net, measure, set_name, threshold)
        for t in sorted(thresholds):
            r = evaluate(params, model, report, EarlyExitConfig(t, measure, layers), per_layer)
            mark = " (calibrated)" if t == threshold else ""
            rows.append((measure, set_name, f"{t}{mark}", r))
            reported[(measure, set_name, t)] = r
    return rows, chosen, (None if best is None else (*best[1:], reported[best[1:]]))


def run(quick: bool) -> str:
    from ultrathink_jax.data import load_tokenizer
    from ultrathink_jax.generate import Engine
    from ultrathink_jax.generate.early_exit import EarlyExitConfig, EarlyExitEngine
    from ultrathink_jax.generate.speculative import SpeculativeConfig, SpeculativeEngine
    from ultrathink_jax.train import layerskip, train
    from ultrathink_jax.train.run import resolve_model_config

    data = os.environ.get(DATA_ENV, "")
    if not pathlib.Path(data).is_file():
        raise FileNotFoundError(f"the adaptive benchmark trains on tiny Shakespeare: ${DATA_ENV} must name its "
                                f"input.txt (karpathy/char-rnn data/tinyshakespeare), got {data!r}")
    data = pathlib.Path(data)
    load = os.getloadavg()[0]
    steps, repeats, n_new, rows = (20, 1, 32, 8) if quick else (STEPS, 5, 128, 64)
    text = data.read_text()
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
        odd = ",".join(map(str, EXIT_SETS["odd"]))

        lines += [f"Load average at start: {load:.1f} on a 2-core machine shared with other jobs: every speed below is "
                  f"a median over {repeats} repeats of ratios of runs made back to back in this one process.", "",
                  f"Models: {model.n_layers} layers, d_model {model.d_model}, vocab {model.vocab_size} (byte-level BPE "
                  f"trained on the corpus), {steps} steps of 16 x 128 tokens each on 90% of tiny Shakespeare; the "
                  f"LayerSkip model adds exit losses at layers 0-{model.n_layers - 2} (rotating, scale {EXIT_SCALE}) "
                  f"and layer dropout p_max 0.1. Held-out: {held_out.shape[0]} rows x {held_out.shape[1]} tokens of "
                  f"the other 10% (half to calibrate the early-exit threshold, half reported). Decoding: batch 1, a "
                  f"64-token prompt, {n_new} new tokens, greedy; decode tokens/s exclude the prefill.", "",
                  f"LayerSkip step time (rotate: one exit head per step, + layer dropout): **{cost:.3f}x** the plain "
                  f"step (goal <= 1.10x).", ""]
        speed_rows = ["| model | held-out ppl | decoder | decode tokens/s | vs plain | acceptance | tokens/round | "
                      "round cost (plain steps) | output = plain greedy |", "|---|---|---|---|---|---|---|---|---|"]
        ee_rows = ["| model | measure | exit layers | threshold | mean exit depth | layer FLOPs saved | check cost | "
                   "net saved | held-out ppl | ppl change | greedy agreement |", "|---" * 11 + "|"]
        goal_rows = []
        for name, (_, result, _) in results.items():
            engine = Engine(result.params, model)
            decoders = {"plain": _decode_timer(lambda: engine.prefill(prompt, n_new),
                                               lambda r: (engine.decode(r), None))}
            specs = {(l, k): SpeculativeEngine(engine, SpeculativeConfig(l, k)) for l, k in SPECULATIVE}
            for (l, k), spec in specs.items():
                decoders[f"speculative, draft {l} layers, k={k}"] = _decode_timer(
                    lambda spec=spec: spec.prefill(prompt, n_new), spec.decode)
            table, chosen, best = _early_exit(engine.params, model, calibration, report, quick)
            for measure, set_name, t, r in table:
                ee_rows.append(f"| {name} | {measure} | {set_name if set_name == 'all' else odd} | {t} | "
                               f"{r.mean_depth:.2f} / {model.n_layers} | {r.layer_flops_saved:.1%} | "
                               f"{r.check_cost:.1%} | {r.net_flops_saved:.1%} | {r.perplexity:.2f} | "
                               f"{100 * r.perplexity_increase:+.2f}% | {r.greedy_agreement:.1%} |")
            full_ppl = table[0][3].full_perplexity
            for measure in THRESHOLDS:  # each measure's calibrated all-layer setting also decodes
                if chosen[(measure, "all")] is not None:
                    ee = EarlyExitEngine(engine, EarlyExitConfig(chosen[(measure, "all")], measure))
                    decoders[f"early exit, {measure} >= {chosen[(measure, 'all')]}"] = _decode_timer(
                        lambda: engine.prefill(prompt, n_new), ee.decode)
            if best is None:
                goal_rows.append(f"- {name}: no setting keeps the perplexity increase <= 2% on the calibration rows.")
            else:
                measure, set_name, t, r = best
                where = "every layer" if set_name == "all" else "layers " + odd
                goal_rows.append(f"- {name}: {measure} >= {t} at {where}: **{r.net_flops_saved:.1%} net** of layer "
                                 f"FLOPs saved ({r.layer_flops_saved:.1%} less {r.check_cost:.1%} for the checks), "
                                 f"held-out perplexity "
                                 f"{100 * r.perplexity_increase:+.2f}%, greedy agreement {r.greedy_agreement:.1%}.")
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
            speed_rows + ["", "Early exit (CALM) against the goal (>= 30% of layer FLOPs saved net of the confidence "
                          "checks, <= 2% held-out perplexity increase). Per model, the setting (measure, exit layers) "
                          "and its threshold are chosen on the calibration rows (the lowest threshold with <= 2% "
                          "increase there; the setting with the most net saving there); the numbers are the other "
                          "rows':", ""] + goal_rows + \
            ["", "Every setting on the reported held-out rows, teacher-forced through the early-exit decode step "
             "(copied KV states included). FLOPs are per token, as at batch 1 decoding where a skipped layer is really "
             "skipped, in multiply-adds of the layers' matmuls (metrics.matmul_params_per_token less the head; "
             "attention scores not counted): a skipped layer still pays its k/v projections (the copied state); the "
             "check cost is one d_model x vocab head matmul per candidate layer a token ran (max_prob) or three "
             "d_model dot products (saturation: cosine of a layer's input and output); net = saved - check cost:",
             ""] + ee_rows
    return "\n".join(lines)
