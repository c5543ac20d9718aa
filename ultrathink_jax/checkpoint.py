"""Training checkpoints with orbax: params, optimizer state, step + RNG, and the data iterator's JSON state.

Each step is one directory `<dir>/<step>/` holding four items (`params`, `opt_state`, `progress`, `data`), so
readers that need only the weights (eval, generate, export) restore `params` alone. Orbax writes a step into a
temporary directory and renames it only when every item is complete, so an interrupted save leaves the previous
checkpoint as the latest one. Restoring takes abstract arrays carrying shardings, so a checkpoint written on one
mesh is read straight onto another.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used for this run; the message names it and the problem."""


class CheckpointNotFoundError(FileNotFoundError, CheckpointError):
    pass


class Checkpoints:
    """`<directory>/<step>/{params,opt_state,progress,data}`; keeps the newest `max_to_keep` steps."""

    ITEMS = ("params", "opt_state", "progress", "data")

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise CheckpointNotFoundError(f"checkpoint directory does not exist: {self.directory}")
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=self.ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, params, opt_state, progress: dict[str, Any], data_state: dict | None) -> None:
        """Starts a save; with async saving it returns once the arrays are copied off the devices."""
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                                  progress=ocp.args.StandardSave(progress),
                                  data=ocp.args.JsonSave(data_state if data_state is not None else {}))
        self._manager.save(step, args=args, force=True)

    def _step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointNotFoundError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointNotFoundError(f"no checkpoint for step {step} in {self.directory}; steps: {steps}")
        return step

    def restore(self, step: int | None, abstract_params, abstract_opt_state, abstract_progress
                ) -> tuple[int, Any, Any, dict, dict]:
        """(step, params, opt_state, progress, data_state), each array placed as its abstract leaf's sharding."""
        step = self._step(step)
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params),
                                  opt_state=ocp.args.StandardRestore(abstract_opt_state),
                                  progress=ocp.args.StandardRestore(abstract_progress),
                                  data=ocp.args.JsonRestore())
        out = self._restore(step, args)
        return step, out["params"], out["opt_state"], out["progress"], dict(out["data"] or {})

    def restore_params(self, step: int | None, abstract_params) -> tuple[int, Any]:
        step = self._step(step)
        return step, self._restore(step, ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))["params"]

    def _restore(self, step: int, args):
        try:
            return self._manager.restore(step, args=args)
        except Exception as e:  # orbax/tensorstore: ValueError for a mismatched tree or unreadable metadata, a bare
            # Exception for truncated array data; the run's model_config.json check names shape changes earlier
            detail = " ".join(str(e).split(". See full TensorStore")[0].split())[:300]
            raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be restored (damaged files or a "
                                  f"different model): {detail}") from e

    def wait(self) -> None:
        """Blocks until a pending async save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves (arrays or ShapeDtypeStructs) placed as `shardings` says."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
