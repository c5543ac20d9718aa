"""Generation speed: JAX engine vs the PyTorch twin vs `transformers.generate`, on the same exported weights."""

from __future__ import annotations

import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ultrathink_jax.config import ModelConfig

TITLE = "Generation: time to first token and decode tokens/s (JAX vs PyTorch twin vs transformers)"
PROMPT_LEN = 32
TORCH_THREADS = 2
PRESETS = ("default", "moe_default")


def _model_config(preset: str) -> ModelConfig:
    """The preset's model as training builds it (vocab_size 0 = sized from the configured tokenizer)."""
    from ultrathink_jax import configs
    from ultrathink_jax.train.run import resolve_model_config

    config = configs.get(preset)
    return resolve_model_config(config, config.data.vocab_size)


def _params(config: ModelConfig):
    """NumPy-filled params of the real tree (the numbers do not matter for speed; the shapes do)."""
    from ultrathink_jax.params import abstract_params

    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: np.asarray(rng.normal(size=s.shape) * 0.05, np.float32),
                        nn.unbox(abstract_params(config)))


def _best(fn, repeats: int) -> float:
    """Fastest of `repeats` timed calls after one warm-up (compilation) call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _jax(config, params, prompts, n_new, repeats):
    from ultrathink_jax.generate import Engine

    engine = Engine(params, config)
    ttft = _best(lambda: jax.block_until_ready(engine.prefill(prompts, n_new).state), repeats)

    def decode():
        run = engine.prefill(prompts, n_new)
        jax.block_until_ready(run.state)
        start = time.perf_counter()
        run = engine.decode(run)
        jax.block_until_ready(run.state)
        return time.perf_counter() - start

    decode()
    seconds = min(decode() for _ in range(repeats))
    return ttft, len(prompts) * (n_new - 1) / seconds


def _torch_timings(call, batch, n_new, repeats):
    """(time to first token, decode tokens/s) of a torch generate call(max_new_tokens) producing batch rows."""
    ttft = _best(lambda: call(1), repeats)
    full = _best(lambda: call(n_new), repeats)
    return ttft, batch * (n_new - 1) / max(full - ttft, 1e-9)


def _twin(hf_dir, prompts, n_new, repeats):
    import torch

    from ultrathink_torch import generate, load_pretrained

    model = load_pretrained(hf_dir)
    ids = torch.tensor(prompts)
    return _torch_timings(lambda n: generate(model, ids, n), len(prompts), n_new, repeats)


def _transformers(hf_dir, prompts, n_new, repeats):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def call(n):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + n, out.shape

    return _torch_timings(call, len(prompts), n_new, repeats)


def run(quick: bool) -> str:
    import torch

    from ultrathink_jax.hf import export_params
    from ultrathink_jax.params import param_count

    torch.set_num_threads(TORCH_THREADS)
    n_new, repeats = (8, 1) if quick else (64, 5)
    batches = (1,) if quick else (1, 8)
    rows = []
    for preset in PRESETS:
        config = _model_config(preset)
        params = _params(config)
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = export_params(params, config, pathlib.Path(tmp) / "model")
            for batch in batches:
                prompts = np.random.default_rng(batch).integers(1, config.vocab_size, (batch, PROMPT_LEN)).tolist()
                results = {"JAX engine": _jax(config, params, prompts, n_new, repeats),
                           "PyTorch twin": _twin(hf_dir, prompts, n_new, repeats),
                           "transformers.generate": _transformers(hf_dir, prompts, n_new, repeats)}
                hf_rate = results["transformers.generate"][1]
                for name, (ttft, rate) in results.items():
                    rows.append(f"| {preset} ({param_count(config) / 1e6:.1f}M) | {batch} | {name} | "
                                f"{ttft * 1e3:.1f} | {rate:.0f} | {rate / hf_rate:.2f}x |")
    table = "\n".join(["| model | batch | implementation | time to first token (ms) | decode tokens/s | "
                       "vs transformers |", "|---|---|---|---|---|---|", *rows])
    return (f"{table}\n\nGreedy, float32, prompt {PROMPT_LEN} tokens, {n_new} new tokens per row (EOS ignored), "
            f"weights random but identical for all three (exported once with `ultrathink_jax.hf.export_params`). "
            f"Time to first token = prompt prefill + first token. Decode tokens/s = batch x {n_new - 1} / time of "
            f"the remaining steps (JAX: on-device `lax.while_loop`; torch: generate(n) - generate(1)). Best of "
            f"{repeats} after a warm-up call (JAX compilation excluded). torch.set_num_threads({TORCH_THREADS}); "
            f"JAX on its default CPU backend (XLA uses every core).")
