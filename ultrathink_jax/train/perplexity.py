"""Perplexity of a trained run on any text (`launch.eval`): every next-token pair of every document scored, the
final partial row included, token-weighted."""

from __future__ import annotations

import math
import os

from jax.sharding import Mesh

from ultrathink_jax import sharding
from ultrathink_jax.config import ConfigError
from ultrathink_jax.data import DataError, build_eval_iterator
from ultrathink_jax.params import param_shardings
from ultrathink_jax.train import run as run_lib
from ultrathink_jax.train.loop import evaluate
from ultrathink_jax.train.steps import make_eval_step


def evaluate_run(workdir: str | os.PathLike, eval_files: str | None = None, step: int | None = None,
                 batch_size: int = 0, mesh: Mesh | None = None) -> dict:
    """{'step', 'loss', 'perplexity', 'tokens', 'source', 'mesh'} of checkpoint `step` (default: the newest intact)
    on `eval_files` (default: the run's held-out data), on `mesh` (default: the run's mesh section, as trained)."""
    if batch_size < 0:
        raise ConfigError(f"--batch_size={batch_size} must be positive")
    mesh = mesh or run_lib.run_mesh(run_lib.load_config(workdir))
    (model, params, tokenizer, config), step = run_lib.load_run_at(workdir, step, mesh)
    data = config.data
    data.cache = False  # do not write token caches into the run directory for ad-hoc texts
    if batch_size:
        data.global_batch_size = batch_size
    dp = sharding.data_parallel_size(mesh)
    data.global_batch_size = -(-data.global_batch_size // dp) * dp  # padded rows carry weight 0
    batches = build_eval_iterator(data, tokenizer, files=eval_files)
    if batches is None:
        raise DataError(f"run {workdir} has no held-out data configured; pass --eval_files")
    with sharding.activate(mesh):
        loss, n = evaluate(make_eval_step(model, param_shardings(model, mesh), mesh), params, batches, mesh)
    source = eval_files or "the run's held-out data"
    return {"step": step, "loss": loss, "perplexity": math.exp(loss), "tokens": int(n), "source": source,
            "mesh": dict(mesh.shape)}
