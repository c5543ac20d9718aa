"""What every launch/ command shares: running its main with the project's errors as one line and an exit
status, and the flags several commands take (`--workdir | --hf_dir`, `--mesh`)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from typing import Callable

from ultrathink_jax.config import ConfigError
from ultrathink_jax.errors import one_line


def run_main(prog: str, main: Callable[[], int]) -> int:
    """Runs `main`; the project's input errors become `prog: error: <one line>` and exit status 2."""
    from ultrathink_jax.checkpoint import CheckpointError
    from ultrathink_jax.data import DataError
    from ultrathink_jax.distributed import DistributedError, finish, wait_for_dead_peer
    from ultrathink_jax.generate import GenerationError
    from ultrathink_jax.hf import ExportError, HFFormatError
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
            DistributedError, GenerationError, HFFormatError, ExportError) as e:
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


def add_model_source(parser: argparse.ArgumentParser, workdir_help: str = "a launch.train run directory",
                     step: bool = True) -> None:
    """Exactly one of --workdir RUN and --hf_dir DIR; with `step`, --step N of --workdir (see check_model_source)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help=workdir_help)
    source.add_argument("--hf_dir", help="a Hugging Face model directory (config.json, safetensors, tokenizer), "
                                         "e.g. from launch.export_hf")
    if step:
        parser.add_argument("--step", type=int, default=None, help="checkpoint step of --workdir (default: the latest)")


def check_model_source(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An --hf_dir has no checkpoint steps: --step with it would be ignored, so it is an error (exit 2)."""
    if getattr(args, "step", None) is not None and args.hf_dir:
        parser.error("--step applies to --workdir only")


def add_mesh_flag(parser: argparse.ArgumentParser, default: str = "the run's mesh section") -> None:
    parser.add_argument("--mesh", default="", help="device mesh as axis=size pairs, e.g. tensor=2,fsdp=4 "
                                                   f"(default: {default})")


def mesh_from_flag(text: str):
    """The Mesh a --mesh value names, or None when it is empty (the caller's default applies). Unlike a training
    config, fixed sizes may cover fewer devices than a single process has (fsdp=1: the first device), since a
    small model often evaluates or decodes fastest on fewer devices."""
    if not text:
        return None
    import jax

    from ultrathink_jax import sharding

    sizes = sharding.parse_mesh(text)
    devices = jax.devices()
    if jax.process_count() == 1 and -1 not in sizes.values():
        devices = devices[:max(math.prod(sizes.values()), 0)]  # a bad size is reported by make_mesh
    return sharding.make_mesh(sizes, devices)
