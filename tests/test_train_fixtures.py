"""Shared helpers for the trainer/eval/checkpoint/CLI tests (no tests here): a tiny learnable corpus and a
tiny config whose model compiles in seconds on the 8 simulated CPU devices."""

from __future__ import annotations

import random
from pathlib import Path

from ultrathink_jax.configs import base

WORDS = ("the cat sat on a mat . a dog ran to the park . birds sing in trees . "
         "we read old books . rain falls on the roof .").split()


def write_corpus(directory: Path, n_train_docs: int = 60, n_eval_docs: int = 6, seed: int = 0) -> tuple[Path, Path]:
    """train.txt / eval.txt of blank-line separated documents made of a few repeated sentences (so a tiny
    model's loss falls within a few steps)."""
    rng = random.Random(seed)
    sentences = " ".join(WORDS).split(" . ")

    def doc() -> str:
        return " ".join(rng.choice(sentences) + " ." for _ in range(rng.randint(3, 8)))

    directory.mkdir(parents=True, exist_ok=True)
    train, evaluation = directory / "train.txt", directory / "eval.txt"
    train.write_text("\n\n".join(doc() for _ in range(n_train_docs)) + "\n")
    evaluation.write_text("\n\n".join(doc() for _ in range(n_eval_docs)) + "\n")
    return train, evaluation


def tiny_config(train_file: Path, eval_file: Path | None = None, **overrides):
    """A 2-layer d_model=32 model on the corpus; `overrides` are dotted keys, e.g. {"train.steps": 5}."""
    config = base.get_config()
    config.model = base.model_section(vocab_size=0, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                      max_seq_len=32, tie_embeddings=True)
    config.data.train_files = str(train_file)
    config.data.eval_files = str(eval_file) if eval_file else ""
    config.data.txt_split = "paragraph"
    config.data.vocab_size = 300
    config.data.seq_len = 32
    config.data.global_batch_size = 16
    config.data.read_threads = 1
    config.train.steps = 12
    config.train.sample_tokens = 0
    config.optim.learning_rate = 1e-2
    config.optim.warmup_steps = 2
    config.checkpoint.every_steps = 4
    config.eval.every_steps = 0
    config.log.every_steps = 4
    config.log.progress = False
    config.log.peak_tflops = 1.0  # skip the matmul measurement
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return config


def make_run_dir(workdir: Path, config, seed: int = 0, transform=None):
    """A run directory as launch.train leaves it, holding a step-0 checkpoint of freshly initialised params
    (no training: nothing to compile but the initialiser), passed through `transform` if given. Returns the
    ModelConfig."""
    import jax.numpy as jnp

    from ultrathink_jax import sharding
    from ultrathink_jax.data import build_tokenizer
    from ultrathink_jax.params import init_params
    from ultrathink_jax.train import run

    tokenizer = build_tokenizer(config.data, workdir)
    model = run.resolve_model_config(config, tokenizer.vocab_size)
    run.write_run_files(workdir, config, model)
    params = init_params(model, sharding.make_mesh({"fsdp": -1}), seed)
    if transform is not None:
        params = transform(params)
    store = run.checkpoints(workdir, config)
    store.save(0, params, {"unused": jnp.zeros(())}, {"step": jnp.zeros((), jnp.int32)}, None)
    store.wait()
    store.close()
    return model
