"""Exports a training run as a Hugging Face model directory:
`python -m launch.export_hf --workdir=RUN [--step=N] --out=DIR [--dtype=float32|bfloat16|float16] [--overwrite]`.

A LoRA run (launch.sft / launch.dpo with posttrain.lora_rank > 0) is exported with its adapters merged into the
weights, or with --peft as a PEFT adapter directory for the export of the run it started from.

The directory loads offline with `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` (llama, mixtral or qwen2_moe, chosen from the model's layout).
"""

import argparse
import sys
import warnings

from ultrathink_jax import cli
from ultrathink_jax.errors import one_line

PROG = "launch.export_hf"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a launch.train run directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    parser.add_argument("--dtype", default="float32", help="weight dtype: float32, bfloat16 or float16")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--peft", action="store_true",
                        help="LoRA runs: write a PEFT adapter directory instead of merged weights")
    args = parser.parse_args(argv)

    def run() -> int:
        from ultrathink_jax.hf import HFCompatibilityWarning
        from ultrathink_jax.posttrain.export import export_any_run

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", HFCompatibilityWarning)
            out = export_any_run(args.workdir, args.out, args.step, args.dtype, args.overwrite, args.peft)
        for w in caught:
            if issubclass(w.category, HFCompatibilityWarning):
                print(f"{PROG}: warning: {one_line(w.message)}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        print(f"exported {args.workdir} to {out}")
        return 0

    return cli.run_main(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
