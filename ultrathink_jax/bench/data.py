"""Data pipeline: tokenizing into shards (MB/s), loader rows/s vs what the training step consumes, and the size of
the data iterator's checkpointed state after 1M and 100M tokens read."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

TITLE = "Data pipeline: tokenize throughput, loader rows/s, data-state checkpoint size"
MB = 1_000_000


def _write_text(path: Path, target_bytes: int) -> int:
    """The embedded corpus (stdlib sources) as JSONL documents, repeated until `target_bytes` of text."""
    from ultrathink_jax.data import StdlibCorpus

    docs = list(StdlibCorpus("train", 0.02, 20 * MB))
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
                written += len(doc.encode("utf-8"))
                if written >= target_bytes:
                    break
    return written


def _step_rows_per_second(cfg, rows_iter) -> tuple[float, str]:
    """Rows/s the configs/default.py train step consumes on this machine (compiled first, then timed)."""
    import jax

    from ultrathink_jax import sharding
    from ultrathink_jax.train import run as run_lib
    from ultrathink_jax.train.loop import step_functions
    from ultrathink_jax.train.state import init_state
    from ultrathink_jax.train.steps import global_batch

    mesh = sharding.make_mesh(dict(cfg.mesh))
    model = run_lib.resolve_model_config(cfg, cfg.data.vocab_size)
    fns = step_functions(model, tuple(sorted(cfg.optim.items())), cfg.train.steps, cfg.train.grad_accum,
                         cfg.train.z_loss_weight, mesh)
    with sharding.activate(mesh):
        state = init_state(model, fns.tx, mesh, 0)
        state, m = fns.train_step(state, global_batch(next(rows_iter), mesh))
        jax.block_until_ready(m)
        n = 5
        start = time.perf_counter()
        for _ in range(n):
            state, m = fns.train_step(state, global_batch(next(rows_iter), mesh))
        jax.block_until_ready(m)
    seconds = (time.perf_counter() - start) / n
    return cfg.data.global_batch_size / seconds, f"{seconds * 1000:.0f} ms/step on {jax.device_count()} device(s)"


def run(quick: bool = False) -> str:
    from ultrathink_jax.configs import default
    from ultrathink_jax.data import FileSource, TrainIterator, train_tokenizer
    from ultrathink_jax.data.shards import PreparedDataset, ShardRows, prepare

    cfg = default.get_config()
    target = (10 if quick else 100) * MB
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text_bytes = _write_text(tmp / "corpus.jsonl", target)
        source = FileSource(str(tmp / "corpus.jsonl"))
        tokenizer = train_tokenizer((d for i, d in zip(range(200), source)), cfg.data.vocab_size)
        results = {}
        for workers in (0, cfg.data.tokenize_workers):
            out = tmp / f"prepared-{workers}"
            start = time.perf_counter()
            manifest = prepare(source, tokenizer, out, workers=workers, shard_chars=8 * MB)
            results[workers] = (time.perf_counter() - start, manifest)
        tokens = results[0][1]["tokens"]
        lines += [f"Tokenizing {text_bytes / MB:.0f} MB of text (the embedded stdlib corpus repeated, JSONL) with "
                  f"a {tokenizer.vocab_size}-token BPE into {len(results[0][1]['shards'])} shards of 8M chars "
                  f"({tokens / 1e6:.1f}M tokens), read + tokenize + write, `os.cpu_count()` = {os.cpu_count()}:",
                  "", "| worker processes | seconds | MB/s | tokens/s |", "|---|---|---|---|"]
        for workers, (seconds, _) in results.items():
            lines.append(f"| {workers or 'none (in process)'} | {seconds:.1f} | {text_bytes / MB / seconds:.2f} | "
                         f"{tokens / seconds / 1e6:.2f}M |")

        dataset = PreparedDataset(tmp / f"prepared-{cfg.data.tokenize_workers}")
        data = cfg.data
        rows = [(ShardRows(dataset.streams, data.seq_len, tokenizer.pad_id), 1.0)]
        it = TrainIterator(rows, dataset.stats, data, tokenizer.pad_id, 0, 1)
        batch_tokens = data.global_batch_size * data.seq_len
        next(it)
        n_batches = -(-1_000_000 // batch_tokens)  # 1M tokens read
        start = time.perf_counter()
        for _ in range(n_batches - 1):
            next(it)
        loader_s = time.perf_counter() - start
        loader_rows = (n_batches - 1) * data.global_batch_size / loader_s
        state_1m = len(json.dumps(it.get_state()))
        it_100m = TrainIterator(rows, dataset.stats, data, tokenizer.pad_id, 0, 1)
        state = it_100m.get_state()
        state["grain"] = {**state["grain"], "next_index": -(-100_000_000 // batch_tokens)}  # 100M tokens read
        it_100m.set_state(state)
        next(it_100m)
        state_100m = len(json.dumps(it_100m.get_state()))
        step_rows, step_note = _step_rows_per_second(cfg, it)
    lines += ["", f"Training loader (grain, {data.read_threads} read threads, packed rows of seq_len {data.seq_len} "
              f"by index from the memory-mapped shards, one process): **{loader_rows:,.0f} rows/s** "
              f"({loader_rows * data.seq_len / 1e6:.2f}M tokens/s). The configs/default.py train step consumes "
              f"{step_rows:,.0f} rows/s here ({step_note}): the loader is {loader_rows / step_rows:,.0f}x faster.",
              "", f"Checkpointed data state (JSON bytes): {state_1m} after 1M tokens read, {state_100m} after 100M "
              "(the grain index set to that position; the state is the same few integers whatever the position). "
              "A streamed Hugging Face dataset's state is also a few integers plus at most seq_len carried tokens "
              "(tests/test_data_streaming.py checks it does not grow with the shuffle buffer).",
              "", "Measured on the shared 2-core machine while other jobs ran: compare ratios within this run."]
    return "\n".join(lines)
