"""Perplexity of a trained run on any text: `python -m launch.eval --workdir=RUN [--eval_files=...] [--step=N]`.

Scores every next-token pair of every document (the final partial row included), token-weighted; without
--eval_files it uses the run's configured held-out data.
"""

import argparse
import math
import sys

from launch import common

PROG = "launch.eval"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--workdir", required=True, help="a launch.train run directory")
    parser.add_argument("--eval_files", default="", help="comma-separated files/globs/directories of text")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--batch_size", type=int, default=0, help="rows per batch (default: the run's)")
    common.add_distributed_args(parser)
    args = parser.parse_args(argv)

    def run() -> int:
        common.start_distributed(args, PROG)
        result = evaluate_run(args.workdir, args.eval_files or None, args.step, args.batch_size)
        import jax

        if jax.process_index() == 0:  # every process computed the same global numbers
            print(f"step {result['step']}: loss {result['loss']:.4f} perplexity {result['perplexity']:.3f} "
                  f"over {result['tokens']} tokens ({result['source']})")
        return 0

    return common.run_main(PROG, run)


def evaluate_run(workdir: str, eval_files: str | None = None, step: int | None = None, batch_size: int = 0) -> dict:
    """{'step', 'loss', 'perplexity', 'tokens', 'source'} of checkpoint `step` (default latest)."""
    from ultrathink_jax import sharding
    from ultrathink_jax.config import ConfigError
    from ultrathink_jax.data import DataError, build_eval_iterator
    from ultrathink_jax.train import checkpoint_steps, evaluate, load_run
    from ultrathink_jax.train.loop import data_parallel_size
    from ultrathink_jax.train.steps import make_eval_step
    from ultrathink_jax.params import param_shardings

    if batch_size < 0:
        raise ConfigError(f"--batch_size={batch_size} must be positive")
    steps = checkpoint_steps(workdir)
    step = step if step is not None else (steps[-1] if steps else None)
    mesh = sharding.make_mesh({"fsdp": -1})
    model, params, tokenizer, config = load_run(workdir, step, mesh)
    data = config.data
    data.cache = False  # do not write token caches into the run directory for ad-hoc texts
    if batch_size:
        data.global_batch_size = batch_size
    dp = data_parallel_size(mesh)
    data.global_batch_size = -(-data.global_batch_size // dp) * dp  # padded rows carry weight 0
    batches = build_eval_iterator(data, tokenizer, files=eval_files)
    if batches is None:
        raise DataError(f"run {workdir} has no held-out data configured; pass --eval_files")
    with sharding.activate(mesh):
        loss, n = evaluate(make_eval_step(model, param_shardings(model, mesh), mesh), params, batches, mesh)
    source = eval_files or "the run's held-out data"
    return {"step": step, "loss": loss, "perplexity": math.exp(loss), "tokens": int(n), "source": source}


if __name__ == "__main__":
    sys.exit(main())
