"""Checkpoints: resharding on restore, retention, interrupted saves, and model-shape mismatches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ultrathink_jax import sharding
from ultrathink_jax.checkpoint import CheckpointError, Checkpoints
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.train import run
from ultrathink_jax.train.state import abstract_state, init_state

CONFIG = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16)
TX = optax.adamw(1e-3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A step-7 checkpoint of a fresh state on an 8-way FSDP mesh."""
    directory = tmp_path_factory.mktemp("ckpt")
    mesh = sharding.make_mesh({"fsdp": -1})
    state = init_state(CONFIG, TX, mesh, seed=1)
    store = Checkpoints(directory, max_to_keep=2, async_save=True)
    store.save(7, state.params, state.opt_state, {"step": state.step + 7, "rng": state.rng}, {"rows": 3})
    store.wait()
    store.close()
    return directory, jax.device_get(state)


def restore(directory, mesh):
    target = abstract_state(CONFIG, TX, mesh)
    store = Checkpoints(directory, read_only=True)
    try:
        return store.restore(None, target.params, target.opt_state, {"step": target.step, "rng": target.rng})
    finally:
        store.close()


def test_checkpoint_from_one_mesh_restores_onto_another_with_its_shardings(saved):
    directory, original = saved
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    step, params, opt_state, progress, data_state = restore(directory, mesh)
    assert step == 7 and int(progress["step"]) == 7 and data_state == {"rows": 3}
    q = params["layers"]["block_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == abstract_state(CONFIG, TX, mesh).params["layers"]["block_0"]["self_attn"]["q_proj"][
        "kernel"].sharding.spec and q.sharding.mesh.shape["tensor"] == 2
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), (params, opt_state),
                         (original.params, original.opt_state))
    assert max(jax.tree.leaves(diffs)) == 0.0, diffs
    np.testing.assert_array_equal(np.asarray(progress["rng"]), original.rng)


def test_only_the_newest_max_to_keep_checkpoints_remain(tmp_path):
    store = Checkpoints(tmp_path, max_to_keep=2, async_save=True)
    for step in (1, 2, 3):
        store.save(step, {"w": jnp.full(3, step, jnp.float32)}, {"mu": jnp.zeros(3)}, {"step": jnp.asarray(step)}, None)
    store.wait()
    assert store.all_steps() == [2, 3]
    store.close()


def test_an_interrupted_save_leaves_the_previous_checkpoint_as_latest(saved, tmp_path):
    directory, _ = saved
    # What a save killed mid-write leaves behind: orbax's temporary directory for the new step, never renamed.
    partial = directory / "9.orbax-checkpoint-tmp-1700000000"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "half_written").write_bytes(b"\0" * 10)
    mesh = sharding.make_mesh({"fsdp": -1})
    assert restore(directory, mesh)[0] == 7
    assert run.has_checkpoint(directory.parent / "nowhere") is False


def test_resuming_a_workdir_with_a_different_model_shape_names_the_fields(tmp_path):
    from ultrathink_jax.configs import base

    config = base.get_config()
    run.write_run_files(tmp_path, config, CONFIG)
    (tmp_path / run.CHECKPOINT_DIR / "5").mkdir(parents=True)
    run.check_same_shapes(tmp_path, ModelConfig(**{**CONFIG.__dict__, "remat_policy": "full"}))  # same shapes
    wider = ModelConfig(**{**CONFIG.__dict__, "d_model": 64, "d_ff": 128})
    with pytest.raises(CheckpointError, match=r"different model shape \(d_model 32 -> 64, d_ff 64 -> 128\)"):
        run.check_same_shapes(tmp_path, wider)
