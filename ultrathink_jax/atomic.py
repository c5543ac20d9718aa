"""Atomic file writes: the file is written under a temporary name beside its target, then renamed onto it, so a
reader (or a crash half-way) never sees half a file under the final name, and an old file stays until replaced."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary path in `path`'s directory; it replaces `path` when the block succeeds and is deleted
    when it fails. The name is unique per call (several processes of one run may write the same file) and starts
    with the target's name, so scans that skip `name*` (e.g. the checkpoint checksums) skip it too."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if the block failed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """`open(path, mode)` for writing ("w" text in UTF-8, or "wb"), atomically as `atomic_path`."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode {mode!r}: expected 'w' or 'wb'")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)
