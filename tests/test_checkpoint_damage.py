"""Damaged checkpoints: every kind of file orbax writes, truncated, deleted or with a flipped byte, makes its step
be skipped with a warning naming it and why (the newest intact one is used), an explicit step an error; nothing is
deleted until a newer good save supersedes it, and a damaged step never counts towards max_to_keep."""

import logging
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultrathink_jax.checkpoint import CHECKSUMS, CheckpointError, Checkpoints

TREE = {"w": jax.ShapeDtypeStruct((4096,), jnp.float32), "b": jax.ShapeDtypeStruct((8,), jnp.float32)}


def state(step: int):
    return ({"w": jnp.arange(4096, dtype=jnp.float32) * step, "b": jnp.full(8, step, jnp.float32)},
            {"mu": jnp.full(16, step, jnp.float32)}, {"step": jnp.asarray(step, jnp.int32)}, {"rows": step})


def save_steps(directory, steps, max_to_keep=3):
    store = Checkpoints(directory, max_to_keep=max_to_keep, async_save=True)
    for step in steps:
        store.save(step, *state(step))
    store.wait()
    store.close()


def restore(directory, step=None):
    store = Checkpoints(directory, read_only=True)
    try:
        got, params, opt_state, progress, data = store.restore(
            step, TREE, {"mu": jax.ShapeDtypeStruct((16,), jnp.float32)}, {"step": jax.ShapeDtypeStruct((), jnp.int32)})
        return got, float(params["b"][0]), float(opt_state["mu"][0]), data
    finally:
        store.close()


def kind(rel: str) -> str:
    """A file's kind: its path with orbax's content-hash names replaced by '*'."""
    return re.sub(r"/[0-9a-f]{32}$", "/*", rel)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pristine")
    save_steps(directory, (1, 2))
    files = sorted(p.relative_to(directory / "2").as_posix() for p in (directory / "2").rglob("*") if p.is_file())
    kinds = {}
    for rel in files:
        kinds.setdefault(kind(rel), rel)
    return directory, kinds


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[:len(data) // 2])
    else:
        flipped = bytearray(data or b"\0")
        flipped[len(flipped) // 2] ^= 0x5A
        path.write_bytes(bytes(flipped))


def test_orbax_writes_the_file_kinds_this_test_damages(pristine):
    _, kinds = pristine
    expected = {"_CHECKPOINT_METADATA", CHECKSUMS, "params/_METADATA", "params/manifest.ocdbt", "params/d/*",
                "params/ocdbt.process_0/manifest.ocdbt", "params/ocdbt.process_0/d/*", "params/_sharding",
                "params/array_metadatas/process_0", "data/metadata", "opt_state/d/*", "progress/d/*"}
    assert expected <= set(kinds), f"orbax layout changed; kinds written: {sorted(kinds)}"


@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
def test_every_kind_of_damaged_file_makes_restore_fall_back_to_the_older_step(pristine, tmp_path, caplog, how):
    directory, kinds = pristine
    failures = []
    for name, rel in sorted(kinds.items()):
        if how == "delete" and name == CHECKSUMS:  # no checksums is not damage: see the test below
            continue
        case = tmp_path / f"{how}-{name.replace('/', '_').replace('*', 'x')}"
        shutil.copytree(directory, case)
        damage(case / "2" / rel, how)
        before = {p: p.read_bytes() for p in case.rglob("*") if p.is_file()}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ultrathink_jax.checkpoint"):
            got = restore(case)
        warned = [r.getMessage() for r in caplog.records]
        if got != (1, 1.0, 1.0, {"rows": 1}) or not any(f"{case / '2'}" in w for w in warned):
            failures.append(f"{rel}: restored {got}, warnings {warned}")
        with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(case / '2'))} is damaged: "):
            restore(case, step=2)
        assert {p: p.read_bytes() for p in case.rglob("*") if p.is_file()} == before, f"{rel}: files changed"
    assert not failures, "\n".join(failures)


def test_without_checksums_an_unreadable_step_is_still_skipped(pristine, tmp_path, caplog):
    directory, kinds = pristine
    shutil.copytree(directory, tmp_path / "c")
    (tmp_path / "c" / "2" / CHECKSUMS).unlink()  # e.g. killed between orbax's commit and the checksums
    for path in (tmp_path / "c" / "2" / "params").rglob("*"):
        if path.parent.name == "d":
            damage(path, "truncate")
    with caplog.at_level(logging.WARNING, logger="ultrathink_jax.checkpoint"):
        assert restore(tmp_path / "c")[0] == 1
    assert any("cannot be restored" in r.getMessage() for r in caplog.records), caplog.records
    with pytest.raises(CheckpointError, match=r"/2 is damaged: cannot be restored \(damaged files") as err:
        restore(tmp_path / "c", step=2)
    assert "\n" not in str(err.value) and "TensorStore details" not in str(err.value), str(err.value)


def test_a_damaged_step_is_kept_until_superseded_and_never_counts_towards_max_to_keep(tmp_path):
    save_steps(tmp_path, (1, 2, 3))
    damage(next((tmp_path / "3" / "params" / "d").iterdir()), "flip")
    store = Checkpoints(tmp_path, max_to_keep=2, async_save=True)
    got = store.restore(None, TREE, {"mu": jax.ShapeDtypeStruct((16,), jnp.float32)},
                        {"step": jax.ShapeDtypeStruct((), jnp.int32)})[0]
    assert got == 2 and store.all_steps() == [1, 2, 3] and store.latest_step() == 2  # restoring deletes nothing
    store.save(4, *state(4))
    store.wait()
    # orbax's own max_to_keep=2 would keep [3, 4]: one intact copy. Ours keeps two intact ones, and the damaged
    # step 3 goes only now that a newer intact save (4) supersedes it.
    assert store.all_steps() == [2, 4], store.all_steps()
    store.close()
    assert restore(tmp_path, 2)[1] == 2.0 and restore(tmp_path)[1] == 4.0


def test_a_new_save_at_a_damaged_step_replaces_it(tmp_path):
    save_steps(tmp_path, (1, 2))
    (tmp_path / "2" / "params" / "_METADATA").unlink()
    store = Checkpoints(tmp_path, max_to_keep=3, async_save=False)
    assert store.restore(None, TREE, {"mu": jax.ShapeDtypeStruct((16,), jnp.float32)},
                         {"step": jax.ShapeDtypeStruct((), jnp.int32)})[0] == 1
    store.save(2, *state(2))
    store.close()
    assert restore(tmp_path) == (2, 2.0, 2.0, {"rows": 2})


def test_all_damaged_is_one_error_naming_each_step(tmp_path):
    save_steps(tmp_path, (1, 2))
    for step in (1, 2):
        damage(tmp_path / str(step) / "progress" / "_METADATA", "truncate")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*\(step 2: progress/_METADATA has \d+ "
                                              r"bytes, \d+ were written; step 1: ") as err:
        restore(tmp_path)
    assert "\n" not in str(err.value)
