"""Tokenizes the training data once into token shards: `python -m launch.tokenize --config=... --out=DIR`.

Reads the config's training source (`data.train_files`, `data.hf_dataset`, or the embedded corpus), uses its
tokenizer (`data.tokenizer`, else trains the configured BPE) and writes DIR/manifest.json, DIR/tokenizer/ and
DIR/shard-*.{tokens,docs}.npy in `data.tokenize_workers` worker processes. Train on it with
`--config.data.prepared=DIR` (and without train_files/hf_dataset), or mix several with
`--config.data.mixture=DIR:0.7,DIR2:0.3`. Re-running on a finished DIR of the same data does nothing.
"""

import argparse
import sys
import time

from ultrathink_jax import cli
from ultrathink_jax.config_files import parse_config_args

PROG = "launch.tokenize"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the prepared dataset (created)")
    parser.add_argument("--progress", default="true", choices=["true", "false"], help="show a progress bar")

    def run() -> int:
        args, config = parse_config_args(parser, argv)
        from ultrathink_jax.data import build_tokenizer, train_source
        from ultrathink_jax.data.shards import prepare

        data = config.data
        start = time.perf_counter()
        manifest = prepare(train_source(data), build_tokenizer(data), args.out, workers=data.tokenize_workers,
                           shard_chars=data.shard_chars, progress=args.progress == "true")
        source = manifest["sources"][0]
        seconds = time.perf_counter() - start
        print(f"{args.out}: {manifest['tokens']} tokens, {manifest['documents']} documents, "
              f"{len(manifest['shards'])} shard(s) from {source['description']} ({source['chars']} chars, "
              f"sha256 {source['content_sha256'][:16]}) in {seconds:.1f}s")
        return 0

    return cli.run_main(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
