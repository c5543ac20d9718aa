"""Trains a model: `python -m launch.train [--config=configs/default.py] [--config.a.b=V ...] [--workdir=DIR]`.

Multi-process: run the same command in every process, with --coordinator_address/--num_processes/--process_id
(or the JAX_* environment variables, or nothing on SLURM / Open MPI / Kubernetes / Cloud TPU); see the README.
Re-running with the same workdir resumes from its latest checkpoint. Everything lands in the workdir
(checkpoints, tokenizer, resolved config, TensorBoard events), so `launch.eval --workdir=DIR` needs nothing else.
"""

import argparse
import sys

from ultrathink_jax.commands import common
from ultrathink_jax import cli
from ultrathink_jax.config_files import parse_config_args

PROG = "launch.train"


def main(argv=None, compile_cache: bool = False) -> int:
    """`compile_cache`: XLA's persistent cache in the workdir (on for the command line; it is process-wide, so
    in-process callers such as tests leave it off)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/default", help="run directory (created; resumed if it exists)")
    common.add_distributed_args(parser)

    def run() -> int:
        args, config = parse_config_args(parser, argv)
        common.start_distributed(args, PROG)
        from ultrathink_jax.train import train

        if compile_cache:
            from ultrathink_jax.train.timing import enable_compilation_cache

            enable_compilation_cache(f"{args.workdir}/xla_cache")  # a rerun of this workdir starts without compiling
        train(config, args.workdir)
        return 0

    return cli.run_main(PROG, run)


if __name__ == "__main__":
    sys.exit(main(compile_cache=True))
