"""On 8 simulated devices, expert-parallel (and expert x fsdp x tensor) MoE equals the 1-device result."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ultrathink_jax import sharding
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.moe import MoEMLP
from ultrathink_jax.moe import dispatch as moe_dispatch

B, T = 8, 6
CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=24, max_seq_len=32,
                  n_experts=4, n_experts_per_tok=2, moe_d_ff=8, shared_expert_d_ff=8, capacity_factor=1.0)
MESHES = [{"expert": 4, "fsdp": 2}, {"expert": 2, "fsdp": 2, "tensor": 2}]

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def inputs():
    # NumPy randomness: jax.random compiles slowly on CPU and is not what is under test
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, T, CFG.d_model)), jnp.float32)
    valid = jnp.arange(T)[None, :] < jnp.array([T, T, 4, T, 2, T, T, 5])[:, None]
    probe = jnp.asarray(rng.normal(size=(B, T, CFG.d_model)), jnp.float32)
    return x, valid, probe


def numpy_params(abstract):
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, jnp.float32), nn.unbox(abstract))


def loss_fn(cfg, params, x, valid, probe):
    y, aux = MoEMLP(cfg).apply(params, x, valid)
    return jnp.sum(y * probe) + aux["aux_loss"] + aux["z_loss"], (y, aux)


def run(cfg, mesh=None):
    x, valid, probe = inputs()
    model = MoEMLP(cfg)
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, cfg), has_aux=True)
    abstract = jax.eval_shape(model.init, jax.random.key(1), x, valid)
    params = numpy_params(abstract)
    if mesh is None:
        return params, jax.jit(grad_fn)(params, x, valid, probe)
    with sharding.activate(mesh):
        params = jax.device_put(params, sharding.state_shardings(mesh, abstract))
        batch = sharding.batch_sharding(mesh, 3)
        x, probe = jax.device_put(x, batch), jax.device_put(probe, batch)
        valid = jax.device_put(valid, sharding.batch_sharding(mesh, 2))
        return params, jax.jit(grad_fn)(params, x, valid, probe)


@functools.lru_cache(maxsize=None)
def reference(dispatch):
    return run(dataclasses.replace(CFG, moe_dispatch=dispatch))


def mesh_id(mesh_sizes):
    return "x".join(f"{k}{v}" for k, v in mesh_sizes.items())


@pytest.mark.parametrize("mesh_sizes", MESHES, ids=mesh_id)
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_sharded_outputs_and_gradients_equal_single_device(dispatch, mesh_sizes):
    cfg = dataclasses.replace(CFG, moe_dispatch=dispatch)
    mesh = sharding.make_mesh(mesh_sizes)
    ref = reference(dispatch)
    if dispatch == "capacity":
        (_, (_, ref_aux)), _ = ref[1]
        assert float(ref_aux["dropped"]) > 0, "capacity_factor=1 should drop something, or the test is weak"
    assert_equal(run(cfg, mesh), ref)


@pytest.mark.parametrize("mesh_sizes", MESHES, ids=mesh_id)
def test_sharded_tiled_dropless_equals_single_device(monkeypatch, mesh_sizes):
    """These small shapes take the dense CPU path; the tiled one (training-sized batches: its hand-written
    `batched_matmul` backward psums over mesh axes inside shard_map) forced on both sides."""
    monkeypatch.setattr(moe_dispatch, "grouped_matmul_impl", lambda *shape: "tiled")
    cfg = dataclasses.replace(CFG, moe_dispatch="dropless")
    assert_equal(run(cfg, sharding.make_mesh(mesh_sizes)), run(cfg))


def assert_equal(sharded, single):
    params, ((loss, (y, aux)), grads) = sharded
    _, ((ref_loss, (ref_y, ref_aux)), ref_grads) = single
    assert params["params"]["wi_gate"].sharding.spec[0] == "expert", params["params"]["wi_gate"].sharding
    y_err = float(jnp.abs(y - ref_y).max())
    assert y_err < 1e-5, y_err
    for name in aux:
        assert np.allclose(aux[name], ref_aux[name], atol=1e-5, rtol=1e-5), (name, aux[name], ref_aux[name])
    grad_errs = jax.tree.map(lambda g, r: float(jnp.abs(g - r).max()), grads, ref_grads)
    worst = max(jax.tree.leaves(grad_errs))
    assert worst < 1e-5, grad_errs
