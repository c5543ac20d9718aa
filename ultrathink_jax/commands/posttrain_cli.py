"""The shared command line of launch.sft and launch.dpo (flags that fill the config's posttrain/data fields)."""

from __future__ import annotations

import argparse
import sys

from ultrathink_jax import cli
from ultrathink_jax.config_files import parse_config_args


def main(prog: str, objective: str, doc: str, argv=None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory (created; resumed if it exists)")
    parser.add_argument("--init", default="", help="run to start from (sets posttrain.init_from)")
    parser.add_argument("--data", default="", help="training jsonl, comma-separated (sets data.train_files)")
    parser.add_argument("--eval_data", default="", help="held-out jsonl (sets data.eval_files)")

    def run() -> int:
        given = list(sys.argv[1:] if argv is None else argv)
        if not any(a == "--config" or a.startswith("--config=") for a in given):
            given.insert(0, f"--config=configs/{objective}.py")
        args, config = parse_config_args(parser, given)
        from ultrathink_jax.config import ConfigError
        from ultrathink_jax.posttrain.loop import fine_tune

        if "posttrain" not in config:
            raise ConfigError(f"config file {args.config} has no posttrain section (use configs/{objective}.py)")
        for flag, (section, key) in {"init": ("posttrain", "init_from"), "data": ("data", "train_files"),
                                     "eval_data": ("data", "eval_files")}.items():
            if getattr(args, flag):
                config[section][key] = getattr(args, flag)
        result = fine_tune(config, args.workdir, objective)
        summary = ", ".join(f"{k} {v:.4f}" for k, v in result.evals.items())
        print(f"{prog}: steps {result.start_step}->{result.final_step} in {args.workdir}"
              + (f"; held-out {summary}" if summary else ""))
        return 0

    return cli.run_main(prog, run)
