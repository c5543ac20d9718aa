"""Perplexity of a trained run on any text: `python -m launch.eval --workdir=RUN [--eval_files=...] [--step=N]
[--mesh=tensor=2,fsdp=4]`.

Scores every next-token pair of every document (the final partial row included), token-weighted; without
--eval_files it uses the run's configured held-out data, on the device mesh the run's config names.
"""

import argparse
import sys

from ultrathink_jax.commands import common
from ultrathink_jax import cli

PROG = "launch.eval"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--workdir", required=True, help="a launch.train run directory")
    parser.add_argument("--eval_files", default="", help="comma-separated files/globs/directories of text")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--batch_size", type=int, default=0, help="rows per batch (default: the run's)")
    cli.add_mesh_flag(parser)
    common.add_distributed_args(parser)
    args = parser.parse_args(argv)

    def run() -> int:
        common.start_distributed(args, PROG)
        from ultrathink_jax.train.perplexity import evaluate_run

        result = evaluate_run(args.workdir, args.eval_files or None, args.step, args.batch_size,
                              cli.mesh_from_flag(args.mesh))
        import jax

        if jax.process_index() == 0:  # every process computed the same global numbers
            print(f"step {result['step']}: loss {result['loss']:.4f} perplexity {result['perplexity']:.3f} "
                  f"over {result['tokens']} tokens ({result['source']})")
        return 0

    return cli.run_main(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
