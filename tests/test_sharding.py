"""The same model on 1 device and on 8 simulated devices (conftest sets the device count) gives the same numbers,
and the mesh really splits the weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_fixtures import init, random_tokens, row_inputs, tiny_config
from ultrathink_jax import sharding
from ultrathink_jax.model import Transformer

MESHES = [{"fsdp": 8}, {"tensor": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2}]


def loss_and_grads(cfg, params, mesh, inputs):
    def loss(p):
        logits = Transformer(cfg).apply({"params": p}, *inputs)[0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits

    batch = sharding.batch_sharding(mesh)
    with sharding.activate(mesh):
        inputs = [jax.device_put(x, batch) for x in inputs]
        fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (value, logits), grads = fn(params)
    return value, logits, grads


@pytest.fixture(scope="module")
def reference():
    cfg = tiny_config(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=128)
    inputs = row_inputs(random_tokens(cfg, (8, 16)))
    params = init(cfg)
    return cfg, inputs, loss_and_grads(cfg, params, sharding.make_mesh({}, jax.devices()[:1]), inputs)


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: "x".join(f"{k}{v}" for k, v in a.items()))
def test_sharded_forward_and_gradients_equal_single_device(reference, axes):
    assert jax.device_count() == 8, "conftest must force 8 host devices"
    cfg, inputs, (value1, logits1, grads1) = reference
    mesh = sharding.make_mesh(axes)
    params = init(cfg, mesh=mesh)
    value, logits, grads = loss_and_grads(cfg, params, mesh, inputs)
    np.testing.assert_allclose(logits, logits1, atol=1e-5)
    assert abs(float(value) - float(value1)) < 1e-5
    flat1 = jax.tree_util.tree_leaves_with_path(grads1)
    for (path, g), (_, g1) in zip(jax.tree_util.tree_leaves_with_path(grads), flat1):
        err = float(np.abs(np.asarray(g) - np.asarray(g1)).max())
        assert err < 1e-5, f"{jax.tree_util.keystr(path)}: max |grad diff| {err:.2e} on mesh {axes}"


def test_sharded_causal_attention_blocks_equal_single_device_without_blocks(reference, monkeypatch):
    """Causal query blocks (`layers.attention.causal_blocks`) slice the sequence axis of batch- and head-sharded
    activations: on a tensor x fsdp mesh, 4 blocks of 4 rows give the one-device, one-block numbers."""
    from ultrathink_jax.layers import attention

    cfg, inputs, (value1, logits1, grads1) = reference  # 16 positions: one block by the default rule
    monkeypatch.setattr(attention, "CAUSAL_BLOCK_MIN_ROWS", 4)
    assert len(attention.causal_blocks(16, 0)) == 4
    mesh = sharding.make_mesh({"tensor": 2, "fsdp": 4})
    value, logits, grads = loss_and_grads(cfg, init(cfg, mesh=mesh), mesh, inputs)
    np.testing.assert_allclose(logits, logits1, atol=1e-5)
    assert abs(float(value) - float(value1)) < 1e-5
    for g, g1 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1)):
        assert float(np.abs(np.asarray(g) - np.asarray(g1)).max()) < 1e-5


@pytest.mark.parametrize("axes,split", [({"fsdp": 8}, 8), ({"tensor": 2, "fsdp": 4}, 8),
                                        ({"data": 2, "fsdp": 2, "tensor": 2}, 4)])
def test_large_weights_are_split_across_devices(reference, axes, split):
    cfg = reference[0]
    params = init(cfg, mesh=sharding.make_mesh(axes))
    attn, mlp = params["layers"]["block_0"]["self_attn"], params["layers"]["block_0"]["mlp"]
    for name, w in [("q_proj", attn["q_proj"]["kernel"]), ("gate_proj", mlp["gate_proj"]["kernel"]),
                    ("down_proj", mlp["down_proj"]["kernel"]), ("lm_head", params["lm_head"]["kernel"])]:
        shard = w.addressable_shards[0].data
        assert shard.size * split == w.size, f"{name}: shard {shard.shape} of {w.shape} on {axes}"


def test_optimizer_like_state_gets_param_shardings():
    """FSDP is ZeRO-3 only if gradients and optimizer moments are split like the params: state_shardings must
    cover any pytree of boxed params (an optax state built from them)."""
    import optax
    from ultrathink_jax.params import abstract_params

    cfg = tiny_config()
    mesh = sharding.make_mesh({"fsdp": 8})
    boxed = abstract_params(cfg)
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, boxed)
    specs = sharding.state_shardings(mesh, opt_state)
    mu = specs[0].mu["layers"]["block_0"]["mlp"]["up_proj"]["kernel"]
    assert mu.spec == jax.sharding.PartitionSpec(None, "fsdp", None), mu.spec


def test_mesh_sizes_are_validated():
    with pytest.raises(sharding.MeshError, match="need 6 devices"):
        sharding.make_mesh({"data": 2, "fsdp": 3})
    with pytest.raises(sharding.MeshError, match="at most one axis may be -1"):
        sharding.make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(sharding.MeshError, match="unknown axis"):
        sharding.make_mesh({"model": 2})
    assert sharding.mesh_shape({"tensor": 2, "fsdp": -1}, 8) == (1, 4, 2, 1)


@pytest.mark.parametrize("axes,expected", [({"fsdp": 8}, 8), ({"data": 2, "fsdp": 2, "tensor": 2}, 4),
                                           ({"expert": 4, "tensor": 2}, 4), ({"tensor": 8}, 1)])
def test_data_parallel_size_counts_the_devices_one_batch_is_split_over(axes, expected):
    mesh = sharding.make_mesh(axes)
    rows = np.arange(16)
    placed = jax.device_put(rows, sharding.batch_sharding(mesh, 1))  # what batch_sharding really does
    distinct = {tuple(np.asarray(s.data)) for s in placed.addressable_shards}
    assert sharding.data_parallel_size(mesh) == len(distinct) == expected, distinct
