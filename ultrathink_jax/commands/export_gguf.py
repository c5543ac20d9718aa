"""Exports a training run or a Hugging Face directory as one GGUF file for llama.cpp:
`python -m launch.export_gguf --workdir=RUN [--step=N] | --hf_dir=DIR --out=FILE.gguf [--dtype=f32|f16|bf16|q8_0]
[--overwrite]`.

The file holds the weights (llama architecture: Llama or Mixtral), the byte-level BPE tokenizer with its special
tokens, and the RoPE / RMSNorm parameters; `llama-cli -m FILE.gguf` or `llama_cpp.Llama(FILE.gguf)` runs it. A
layout llama.cpp cannot run (e.g. a leading dense layer in an MoE model) is refused with what to change.
"""

import argparse
import sys

from ultrathink_jax import cli

PROG = "launch.export_gguf"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_source(parser)
    parser.add_argument("--out", required=True, help="output .gguf file")
    parser.add_argument("--dtype", default="f32", help="weight type: f32, f16, bf16 or q8_0 (norms stay f32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    cli.check_model_source(parser, args)

    def run() -> int:
        from ultrathink_jax.hf.gguf_export import export_gguf_from_hf, export_gguf_from_run

        if args.workdir:
            out = export_gguf_from_run(args.workdir, args.out, args.step, args.dtype, args.overwrite)
        else:
            out = export_gguf_from_hf(args.hf_dir, args.out, args.dtype, args.overwrite)
        print(f"exported {args.workdir or args.hf_dir} to {out}")
        return 0

    return cli.run_main(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
