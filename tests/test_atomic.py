"""ultrathink_jax.atomic: the one write-then-rename used for every file that must never be seen half-written."""

import numpy as np
import pytest

from ultrathink_jax import atomic


def test_write_text_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")
    atomic.write_text(target, "new ü\n")
    assert target.read_text(encoding="utf-8") == "new ü\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "shard.npy"
    target.write_bytes(b"intact")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.atomic_open(target, "wb") as f:
            f.write(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.npy"]


def test_the_temporary_is_beside_the_target_and_unique_per_write(tmp_path):
    target = tmp_path / "checksums.json"
    with atomic.atomic_path(target) as first, atomic.atomic_path(target) as second:
        assert first != second
        for tmp in (first, second):  # same directory (so the rename is atomic) and named after the target
            assert tmp.parent == tmp_path and tmp.name.startswith("checksums.json.")
            tmp.write_text(tmp.name)
    assert target.read_text() == first.name  # the outer block finished last
    assert not first.exists() and not second.exists()


def test_binary_writes_go_through_a_file_handle(tmp_path):
    target = tmp_path / "tokens.npz"  # np.savez given a path would append its own suffix; a handle keeps the name
    with atomic.atomic_open(target, "wb") as f:
        np.savez(f, tokens=np.arange(3))
    assert np.array_equal(np.load(target)["tokens"], np.arange(3))


def test_only_write_modes_are_accepted(tmp_path):
    with pytest.raises(ValueError, match="mode 'a'"):
        with atomic.atomic_open(tmp_path / "x", "a"):
            pass
