"""Training checkpoints with orbax: params, optimizer state, step + RNG, and the data iterator's JSON state.

Each step is one directory `<dir>/<step>/` holding four items (`params`, `opt_state`, `progress`, `data`), so
readers that need only the weights (eval, generate, export) restore `params` alone. Orbax writes a step into a
temporary directory and renames it only when every item is complete, so an interrupted save leaves the previous
checkpoint as the latest one. Restoring takes abstract arrays carrying shardings, so a checkpoint written on one
mesh is read straight onto another.

Damage: orbax stores array bytes without checksums (a flipped byte restores as a wrong number), so once a save is
committed every file's size and CRC-32 go into `<step>/checksums.json`. Restoring without an explicit step tries the
newest checkpoint first and skips, with a warning naming it and why, any whose files are missing, truncated or
changed (or, without checksums, that orbax cannot read). Retention is ours, not orbax's: the newest `max_to_keep`
intact checkpoints are kept, a damaged one never counts among them and is removed only once a newer intact save
exists.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ultrathink_jax import atomic
from ultrathink_jax.errors import one_line

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
ON_ERROR = ("stop", "continue")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used for this run; the message names it and the problem."""


class CheckpointNotFoundError(FileNotFoundError, CheckpointError):
    pass


class CheckpointSaveError(CheckpointError):
    """A save failed (disk full, permission denied, ...); the previous checkpoint is untouched."""


def _one_line(e: BaseException) -> str:
    """TensorStore appends a long debug trailer to its messages; the first part is what the user needs."""
    return one_line(e).split(". See full TensorStore")[0][:300]


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_sums(step_dir: Path, sizes_only: bool = False) -> dict[str, list[int]]:
    return {p.relative_to(step_dir).as_posix(): [p.stat().st_size] + ([] if sizes_only else [_crc32(p)])
            for p in sorted(step_dir.rglob("*")) if p.is_file() and not p.name.startswith(CHECKSUMS)}


def verify(step_dir: Path, items: tuple[str, ...]) -> str | None:
    """Why `step_dir` is damaged (its files of `items` and top level against checksums.json), or None if intact
    or never summed."""
    manifest = step_dir / CHECKSUMS
    if not manifest.is_file():
        return None
    try:
        expected = json.loads(manifest.read_text())
    except (ValueError, OSError) as e:
        return f"{CHECKSUMS} unreadable: {_one_line(e)}"
    def checked(rel: str) -> bool:
        return "/" not in rel or rel.split("/", 1)[0] in items

    try:
        expected = {rel: (int(size), int(crc)) for rel, (size, crc) in expected.items() if checked(rel)}
    except (AttributeError, TypeError, ValueError):
        return f"{CHECKSUMS} is malformed"
    unlisted = sorted(set(rel for rel in _file_sums(step_dir, sizes_only=True) if checked(rel)) - set(expected))
    if unlisted:
        return f"{unlisted[0]} is not in {CHECKSUMS}"
    for rel, (size, crc) in expected.items():
        path = step_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, {size} were written"
        if _crc32(path) != crc:
            return f"{rel} has changed since it was written (checksum mismatch)"
    return None


def non_finite_leaves(tree) -> list[str]:
    """Paths of the leaves of `tree` holding a NaN or an infinity (reads every array)."""
    return [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if not bool(np.isfinite(np.asarray(jax.device_get(x), np.float64)).all())]


class Checkpoints:
    """`<directory>/<step>/{params,opt_state,progress,data}`; keeps the newest `max_to_keep` intact steps.

    A failing save (`CheckpointSaveError`) is raised or logged per `on_error` ("stop" / "continue") when it is
    noticed: at once for a synchronous save, at the next save or `wait()` for an async one."""

    ITEMS = ("params", "opt_state", "progress", "data")

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False, on_error: str = "stop"):
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise CheckpointNotFoundError(f"checkpoint directory does not exist: {self.directory}")
        if on_error not in ON_ERROR:
            raise CheckpointError(f"checkpoint on_error={on_error!r} must be one of {ON_ERROR}")
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save,
                                                   cleanup_tmp_directories=True)
        self.max_to_keep, self.on_error, self._async = max_to_keep, on_error, async_save and not read_only
        self.damaged: dict[int, str] = {}  # step -> why, as found by restore
        self._pending: int | None = None  # a started save not yet confirmed
        self._saved_good: int | None = None  # the newest save this process confirmed
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=self.ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step on disk not known to be damaged (a save in flight is not counted)."""
        good = [s for s in self.all_steps() if s not in self.damaged]
        return good[-1] if good else None

    def save(self, step: int, params, opt_state, progress: dict[str, Any], data_state: dict | None) -> None:
        """Starts a save; with async saving it returns once the arrays are copied off the devices."""
        self._confirm_pending()
        if step in self.damaged:  # superseded by this save
            log.warning("replacing damaged checkpoint %s (%s)", self.directory / str(step), self.damaged.pop(step))
            self._manager.delete(step)
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                                  progress=ocp.args.StandardSave(progress),
                                  data=ocp.args.JsonSave(data_state if data_state is not None else {}))
        self._pending = step
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as e:  # a synchronous write (or directory creation) failing
            self._pending = None
            self._save_failed(step, e)
            return
        if not self._async:
            self._confirm_pending()

    def _confirm_pending(self) -> None:
        """Waits for the save in flight; then sums its files, applies retention, or reports its failure."""
        step, self._pending = self._pending, None
        if step is None:
            return
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
            self._manager.reload()
            if step not in self._manager.all_steps():
                raise OSError("orbax did not commit it")
            if jax.process_index() == 0:
                step_dir = self.directory / str(step)
                atomic.write_text(step_dir / CHECKSUMS, json.dumps(_file_sums(step_dir)))
        except Exception as e:
            self._save_failed(step, e)
            return
        self._saved_good = step
        self._apply_retention()

    def _save_failed(self, step: int, e: BaseException) -> None:
        good = self.latest_step()
        message = (f"saving checkpoint step {step} in {self.directory} failed: {_one_line(e)}; "
                   + (f"step {good} is intact" if good is not None else "no earlier checkpoint"))
        if self.on_error == "stop":
            raise CheckpointSaveError(message) from e
        log.error("%s; training continues (checkpoint.on_error=continue)", message)

    def _apply_retention(self) -> None:
        steps = self.all_steps()
        good = [s for s in steps if s not in self.damaged]
        doomed = good[:-self.max_to_keep] if len(good) > self.max_to_keep else []
        doomed += [s for s in self.damaged if s in steps and s <= self._saved_good]  # superseded by a newer save
        for s in sorted(set(doomed)):
            self._manager.delete(s)
            self.damaged.pop(s, None)

    def _candidates(self, step: int | None) -> list[int]:
        steps = self.all_steps()
        if not steps:
            raise CheckpointNotFoundError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[::-1]
        if step not in steps:
            raise CheckpointNotFoundError(f"no checkpoint for step {step} in {self.directory}; steps: {steps}")
        return [step]

    def _restore_newest_intact(self, step: int | None, items: tuple[str, ...], args) -> tuple[int, Any]:
        """Restores `step`, or (None) the newest checkpoint that reads back; damaged ones are warned about."""
        problems = []
        for s in self._candidates(step):
            why = verify(self.directory / str(s), items)
            if why is None:
                try:
                    return s, self._manager.restore(s, args=args)
                except Exception as e:  # orbax/tensorstore: truncated data, unreadable metadata, another tree
                    why = f"cannot be restored (damaged files or a different model): {_one_line(e)}"
            if step is not None:
                raise CheckpointError(f"checkpoint {self.directory / str(s)} is damaged: {why}")
            self.damaged[s] = why
            problems.append(f"step {s}: {why}")
            log.warning("skipping damaged checkpoint %s: %s", self.directory / str(s), why)
        raise CheckpointError(f"no intact checkpoint in {self.directory} ({'; '.join(problems)})")

    def restore(self, step: int | None, abstract_params, abstract_opt_state, abstract_progress
                ) -> tuple[int, Any, Any, dict, dict]:
        """(step, params, opt_state, progress, data_state), each array placed as its abstract leaf's sharding."""
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params),
                                  opt_state=ocp.args.StandardRestore(abstract_opt_state),
                                  progress=ocp.args.StandardRestore(abstract_progress),
                                  data=ocp.args.JsonRestore())
        step, out = self._restore_newest_intact(step, self.ITEMS, args)
        return step, out["params"], out["opt_state"], out["progress"], dict(out["data"] or {})

    def restore_params(self, step: int | None, abstract_params) -> tuple[int, Any]:
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        step, out = self._restore_newest_intact(step, ("params",), args)
        return step, out["params"]

    def wait(self) -> None:
        """Blocks until a pending async save has been committed (or its failure reported per on_error)."""
        self._confirm_pending()

    def close(self) -> None:
        try:
            self._confirm_pending()
        finally:
            self._manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves (arrays or ShapeDtypeStructs) placed as `shardings` says."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
