"""A damaged checkpoint (truncated array files) is reported as one CheckpointError naming the step, not a wall of
tensorstore tracebacks; the files are left as they are."""

import jax.numpy as jnp
import pytest

from ultrathink_jax.checkpoint import CheckpointError, Checkpoints


def test_truncated_array_files_give_one_unreadable_checkpoint_error(tmp_path):
    params = {"w": jnp.arange(4096, dtype=jnp.float32)}
    store = Checkpoints(tmp_path, async_save=False)
    store.save(3, params, {"mu": jnp.zeros(3)}, {"step": jnp.asarray(3)}, None)
    store.close()
    data_files = [p for p in (tmp_path / "3" / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files, "orbax layout changed: no array data files found"
    for path in data_files:
        path.write_bytes(path.read_bytes()[:16])
    damaged = {p: p.read_bytes() for p in data_files}

    reader = Checkpoints(tmp_path, read_only=True)
    with pytest.raises(CheckpointError, match=r"checkpoint .*/3 cannot be restored \(damaged files or a different model\)") as err:
        reader.restore_params(None, {"w": jnp.zeros(4096, jnp.float32)})
    reader.close()
    assert "\n" not in str(err.value) and "TensorStore details" not in str(err.value)
    assert {p: p.read_bytes() for p in data_files} == damaged
