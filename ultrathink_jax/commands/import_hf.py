"""Turns a Hugging Face llama / mixtral / qwen2_moe checkpoint (safetensors + tokenizer.json) into a training run:
`python -m launch.import_hf --hf_dir=DIR --workdir=RUN [--config=configs/default.py] [--config.a.b=V ...]`.

The model section comes from DIR/config.json; the rest (data, optimizer, mesh, ...) from --config. Fine-tune with
`python -m launch.train --config=RUN/config.py --workdir=RUN`, which resumes from the imported step 0.
"""

import argparse
import sys

from ultrathink_jax import cli
from ultrathink_jax.config_files import parse_config_args

PROG = "launch.import_hf"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_dir", required=True, help="Hugging Face model directory")
    parser.add_argument("--workdir", required=True, help="new run directory (must hold no checkpoint)")

    def run() -> int:
        args, config = parse_config_args(parser, argv)
        from ultrathink_jax.hf.run import import_run

        workdir = import_run(args.hf_dir, args.workdir, config)
        print(f"imported {args.hf_dir} into {workdir}; fine-tune with: "
              f"python -m launch.train --config={workdir}/config.py --workdir={workdir}")
        return 0

    return cli.run_main(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
