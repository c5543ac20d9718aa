"""CLI plumbing shared by the launch scripts: config files with dotted overrides, and one-line errors.

    python -m launch.train --config=configs/small.py --config.train.steps=2000 --workdir=runs/x

`--config` is a Python file defining `get_config()` returning an ml_collections ConfigDict (a path in the working
directory, else a packaged preset: `configs/small.py` works from any directory); every `--config.a.b=value`
override must name an existing field and is converted to that field's type.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Callable, Sequence

import ml_collections

from ultrathink_jax import configs
from ultrathink_jax.config import ConfigError

DEFAULT_CONFIG = "configs/default.py"
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """get_config() of `path` in the working directory, else of the packaged preset a `configs/NAME.py` names."""
    return configs.load(path)


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


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """Multi-process flags (see ultrathink_jax/distributed.py); on SLURM/MPI/K8s/Cloud TPU none are needed."""
    g = parser.add_argument_group("multi-process (default: $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, "
                                  "$JAX_PROCESS_ID, or the cluster JAX detects)")
    g.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    g.add_argument("--num_processes", type=int, default=None, help="processes in the job")
    g.add_argument("--process_id", type=int, default=None, help="this process, 0 .. num_processes-1")
    g.add_argument("--heartbeat_timeout", type=int, default=30,
                   help="seconds of silence after which a peer counts as dead and the others exit")
    g.add_argument("--init_timeout", type=int, default=300, help="seconds to wait for every process to join")


def start_distributed(args: argparse.Namespace, prog: str) -> bool:
    """Joins the job's distributed runtime (before any device is touched); False for a single process."""
    from ultrathink_jax import distributed

    settings = distributed.settings_from(args.coordinator_address, args.num_processes, args.process_id,
                                         args.heartbeat_timeout, args.init_timeout)
    return distributed.initialize(settings, prog)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def run_main(prog: str, main: Callable[[], int]) -> int:
    """Runs `main`; the project's input errors become `prog: error: <one line>` and exit status 2."""
    from ultrathink_jax.checkpoint import CheckpointError
    from ultrathink_jax.data import DataError
    from ultrathink_jax.distributed import DistributedError, finish, wait_for_dead_peer
    from ultrathink_jax.sharding import MeshError
    from ultrathink_jax.train import TrainingError
    from ultrathink_jax.train.preemption import EXIT_STATUS, Preempted

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from absl import logging as absl_logging

    # orbax's warnings are not for CLI users, nor its tracebacks of a failed save: that is reported in one line
    absl_logging.set_verbosity(absl_logging.FATAL)
    # A damaged checkpoint fails every parallel array read; orbax's sibling tasks then log "exception was never
    # retrieved" walls. The first failure reaches us and is reported as one CheckpointError line.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    # A failed async save leaves orbax coroutines unawaited; Python would name each one at exit.
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    try:
        code = main()
        finish()  # peers must not take this process's clean exit for a crash
        return code
    except (ConfigError, MeshError, DataError, CheckpointError, FileNotFoundError, TrainingError,
            DistributedError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Preempted as e:
        finish()  # every process stopped at the same step: an orderly exit, not a dead peer
        print(f"{prog}: {one_line(e)}", file=sys.stderr)
        return EXIT_STATUS
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        wait_for_dead_peer()  # a failed collective of a multi-process run: report the dead peer instead
        raise
