"""The decoder with MoE layers: dense equivalence, forward/grad, 8-device parity, KV-cached decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from model_fixtures import jitted_apply, random_tokens, row_inputs, tiny_config
from ultrathink_jax import sharding
from ultrathink_jax.losses import cross_entropy
from ultrathink_jax.model import Transformer, init_cache
from ultrathink_jax.moe import moe_loss
from ultrathink_jax.params import abstract_params, param_shardings

# two MoE layers, kept small: XLA's CPU compile of forward + backward dominates these tests
MOE = dict(n_layers=2, d_model=32, n_heads=2, n_kv_heads=2, d_ff=32, vocab_size=64, n_experts=4, n_experts_per_tok=2,
           moe_d_ff=16)


def numpy_params(cfg, seed=0):
    """Params of the real tree filled from NumPy (jax.random compiles slowly on CPU; init is tested elsewhere).
    Routers get a large std so top-k choices are decisive and cannot flip on float-rounding differences."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        std = 1.0 if "router" in jax.tree_util.keystr(path) else 0.05
        return jnp.asarray(rng.normal(size=leaf.shape) * std, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract_params(cfg)))


def test_one_expert_top1_moe_equals_the_dense_model():
    dense = tiny_config()
    moe = tiny_config(n_experts=1, n_experts_per_tok=1, moe_d_ff=dense.d_ff)
    params = numpy_params(dense)
    rest = {k: v for k, v in params.items() if k != "layers"}
    block = dict(params["layers"]["block_0"])
    mlp = {k: v["kernel"] for k, v in block.pop("mlp").items()}
    block["moe"] = {
        "router": {"kernel": jnp.zeros(mlp["gate_proj"].shape[:2] + (1,))},  # one expert: softmax weight 1
        "wi_gate": mlp["gate_proj"][:, None], "wi_up": mlp["up_proj"][:, None], "wo": mlp["down_proj"][:, None]}
    tokens = random_tokens(dense, (2, 8))
    want = jitted_apply(dense)(params, *row_inputs(tokens))[0]
    got = jitted_apply(moe)(rest | {"moe_units": {"block_0": block}}, *row_inputs(tokens))[0]
    err = float(jnp.abs(got - want).max())
    assert err < 1e-5, err


def lm_loss(cfg, params, tok, pos, seg):
    logits, aux, _ = Transformer(cfg).apply({"params": params}, tok, pos, seg)
    ce, n = cross_entropy(logits[:, :-1], tok[:, 1:], (seg[:, 1:] > 0).astype(jnp.float32))
    return ce / n + moe_loss(aux["moe"], cfg), (logits, aux)


def test_moe_model_forward_aux_and_gradients():
    cfg = tiny_config(**MOE, moe_dispatch="capacity", shared_expert_d_ff=16)  # jitter: see test_moe_training
    params = numpy_params(cfg)
    tokens = random_tokens(cfg, (2, 12))
    segments = np.ones((2, 12), np.int32)
    segments[1, 9:] = 0  # padding
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(lm_loss, cfg), has_aux=True))
    (loss, (logits, aux)), grads = grad_fn(params, *row_inputs(tokens, segments))
    moe = aux["moe"]
    assert moe["expert_counts"].shape == (2, 4), moe["expert_counts"].shape  # [MoE layer, expert]
    np.testing.assert_allclose(moe["n_valid"], [21, 21])
    np.testing.assert_allclose(moe["expert_counts"].sum(-1), [42, 42])
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(logits)).all()
    g = grads["moe_units"]["block_0"]["moe"]
    assert (np.abs(np.asarray(g["router"]["kernel"])).reshape(2, -1).max(-1) > 0).all(), "router of each layer"
    for name in ("wi_gate", "wi_up", "wo"):
        per_expert = np.abs(np.asarray(g[name])).reshape(2, 4, -1).max(-1)  # [layer, expert]
        assert (per_expert > 0).all(), (name, per_expert)


def sharded_run(cfg, params, mesh, tokens):
    inputs = row_inputs(tokens)
    grad_fn = jax.value_and_grad(functools.partial(lm_loss, cfg), has_aux=True)
    if mesh is None:
        return jax.jit(grad_fn)(params, *inputs)
    batch = sharding.batch_sharding(mesh)
    with sharding.activate(mesh):
        params = jax.device_put(params, param_shardings(cfg, mesh))
        assert params["moe_units"]["block_0"]["moe"]["wi_gate"].sharding.spec[1] == "expert"
        return jax.jit(grad_fn)(params, *(jax.device_put(x, batch) for x in inputs))


# capacity dispatch and expert x fsdp x tensor meshes are covered layer-level in test_moe_sharding.py
@pytest.mark.parametrize("dispatch,axes", [("dropless", {"expert": 4, "fsdp": 2})], ids=["dropless-expert4xfsdp2"])
def test_sharded_moe_model_equals_single_device(dispatch, axes):
    assert jax.device_count() == 8, "conftest must force 8 host devices"
    cfg = tiny_config(**MOE, moe_dispatch=dispatch, capacity_factor=1.0)
    params = numpy_params(cfg)
    tokens = random_tokens(cfg, (8, 8))
    (loss1, (logits1, aux1)), grads1 = sharded_run(cfg, params, None, tokens)
    (loss, (logits, aux)), grads = sharded_run(cfg, params, sharding.make_mesh(axes), tokens)
    if dispatch == "capacity":
        assert float(aux1["moe"]["dropped"].sum()) > 0, "capacity_factor=1 should drop something"
    err = float(jnp.abs(logits - logits1).max())
    assert err < 1e-5 and abs(float(loss) - float(loss1)) < 1e-5, (err, float(loss), float(loss1))
    for (path, g), g1 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads1)):
        err = float(np.abs(np.asarray(g) - np.asarray(g1)).max())
        assert err < 1e-5, f"{jax.tree_util.keystr(path)}: max |grad diff| {err:.2e} on mesh {axes}"


def test_kv_cached_decoding_equals_full_recompute_with_moe():
    cfg = tiny_config(**MOE)  # dropless: a token's expert output does not depend on the other tokens
    params = numpy_params(cfg)
    apply = jitted_apply(cfg)
    tokens = random_tokens(cfg, (2, 12))
    full = apply(params, *row_inputs(tokens))[0]
    cache = init_cache(cfg, batch=2, max_len=16)
    prompt = 7
    step_logits, _, cache = apply(params, *row_inputs(tokens[:, :prompt]), cache)
    outs = [step_logits]
    for t in range(prompt, 12):
        tok, seg = jnp.asarray(tokens[:, t:t + 1]), jnp.ones((2, 1), jnp.int32)
        step_logits, _, cache = apply(params, tok, jnp.full((2, 1), t), seg, cache)
        outs.append(step_logits)
    err = float(jnp.abs(jnp.concatenate(outs, axis=1) - full).max())
    assert err < 1e-5, err
