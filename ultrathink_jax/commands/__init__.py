"""The command lines. Installed (`pip install .`), `ultrathink COMMAND [flags]` runs COMMAND's `main`; in a checkout
`python -m launch.COMMAND` runs the same module (launch/__init__.py points there). `ultrathink COMMAND --help`
lists a command's flags."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

# command -> module of this package
COMMANDS = {"train": "train", "eval": "eval", "generate": "generate", "tokenize": "tokenize",
            "export-hf": "export_hf", "export-gguf": "export_gguf", "import-hf": "import_hf", "sft": "sft",
            "dpo": "dpo", "constitutional": "constitutional", "bench": "bench"}
USAGE = f"usage: ultrathink {{{','.join(COMMANDS)}}} [flags]   (ultrathink COMMAND --help for its flags)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{USAGE}\nultrathink: error: unknown command {name!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{COMMANDS[name]}")
    if name == "train":  # the command line's XLA compilation cache in the workdir, as `python -m launch.train`
        return module.main(rest, compile_cache=True)
    return module.main(rest)
