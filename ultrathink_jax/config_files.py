"""Config files with dotted command-line overrides (the `--config` flags of launch.train, tokenize, import_hf,
sft and dpo).

    python -m launch.train --config=configs/small.py --config.train.steps=2000 --workdir=runs/x

`--config` is a Python file defining `get_config()` returning an ml_collections ConfigDict (a path in the working
directory, else a packaged preset: `configs/small.py` works from any directory); every `--config.a.b=value`
override must name an existing field and is converted to that field's type.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Sequence

import ml_collections

from ultrathink_jax import configs
from ultrathink_jax.config import ConfigError

DEFAULT_CONFIG = "configs/default.py"
PRESET_PREFIX = "configs"  # `--config=configs/NAME.py` names a packaged preset when no such file is in the cwd
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Runs get_config() of the file `path` (the working directory first), else of the packaged preset that a
    `configs/NAME.py` path names (ultrathink_jax/configs/NAME.py: an installed copy has them too)."""
    file = Path(path)
    if file.is_file():
        return _from_file(file, path)
    if not file.is_absolute() and file.parent == Path(PRESET_PREFIX) and file.suffix == ".py" \
            and file.stem in configs.presets():
        return configs.get(file.stem)
    raise ConfigError(f"config file not found: {path} (not in the working directory, nor a packaged preset "
                      f"{PRESET_PREFIX}/NAME.py with NAME one of {configs.presets()})")


def _from_file(file: Path, path: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        if e.name != "configs":
            raise
        raise ConfigError(f"config file {path} imports `configs`, which is now `ultrathink_jax.configs` "
                          "(e.g. `from ultrathink_jax.configs import base`)") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    return module.get_config()


def _convert(key: str, current, raw: str):
    try:
        if isinstance(current, bool):
            if raw.lower() not in _TRUE + _FALSE:
                raise ValueError(raw)
            return raw.lower() in _TRUE
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
    except ValueError:
        raise ConfigError(f"config: {key}={raw!r} is not a valid {type(current).__name__}") from None
    return raw


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Sets dotted `key` (e.g. "train.steps") from its command-line text; unknown keys raise ConfigError."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:i]) or "the config"
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(f"unknown config key {key!r}: {where} has no field {part!r}; known: {known}")
        if i < len(parts) - 1:
            node = node[part]
    if isinstance(node[parts[-1]], ml_collections.ConfigDict):
        raise ConfigError(f"config key {key!r} is a section; override one of its fields")
    node[parts[-1]] = _convert(key, node[parts[-1]], raw)


# Why not ml_collections.config_flags (checked with ml-collections 1.1.0): it parses through absl FlagValues, beside
# these CLIs' argparse flags; an unknown key (`--config.train.nosuch=1`, `--config.nosection.x=1`) escapes its parser
# as a bare AttributeError / KeyError traceback instead of one line naming the known fields; DEFINE_config_file
# opens the path itself, so `configs/NAME.py` cannot fall back to the packaged presets outside a checkout (a
# multi-line OSError); and booleans refuse yes/no. Wrapping it to fix those would be longer than this parser.
def parse_config_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None
                      ) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
    """Adds --config, parses; the remaining `--config.a.b=V` / `--config.a.b V` arguments become overrides."""
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config file defining get_config()")
    args, rest = parser.parse_known_args(argv)
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--config."):
            parser.error(f"unrecognized argument {arg!r}")
        key, sep, value = arg[len("--config."):].partition("=")
        if not sep:
            if i + 1 >= len(rest):
                parser.error(f"{arg} needs a value")
            value, i = rest[i + 1], i + 1
        overrides.append((key, value))
        i += 1
    config = load_config_file(args.config)
    for key, value in overrides:
        apply_override(config, key, value)
    return args, config
