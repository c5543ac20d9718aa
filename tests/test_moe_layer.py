"""MoEMLP end to end: exact agreement with transformers' Mixtral / Qwen2-MoE blocks, jitter, padding, grads."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import required_module
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.moe import MoEMLP

B, T = 2, 10
CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=24, max_seq_len=32,
                  n_experts=4, n_experts_per_tok=2, moe_d_ff=12)


def init(cfg, seed=0):
    """NumPy-filled params of the layer's real structure (jax.random compiles slowly on CPU; init has its own
    test). Router weights are wide so routing is decisive: near-ties could flip on float noise."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, T, cfg.d_model)), jnp.float32)
    valid = jnp.ones((B, T), bool)
    shapes = nn.unbox(jax.eval_shape(MoEMLP(cfg).init, jax.random.key(0), x, valid))
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(rng.normal(size=s.shape) * (1.0 if "router" in str(path) else 0.3), jnp.float32),
        shapes)
    return params, x, valid


@functools.lru_cache(maxsize=None)
def jitted(cfg, deterministic):  # one compile per (config, mode); eager op-by-op dispatch is slower
    return jax.jit(lambda params, x, valid, rngs: MoEMLP(cfg).apply(params, x, valid, deterministic, rngs=rngs))


def apply(cfg, params, x, valid, deterministic=True, rngs=None):
    return jitted(cfg, deterministic)(params, x, valid, rngs)


def to_torch(a):
    import torch
    return torch.from_numpy(np.array(a, dtype=np.float32))


def load_experts(block, p):
    import torch
    gate_up = np.concatenate([np.swapaxes(p["wi_gate"], 1, 2), np.swapaxes(p["wi_up"], 1, 2)], axis=1)
    with torch.no_grad():
        block.gate.weight.copy_(to_torch(p["router"]["kernel"].T))
        block.experts.gate_up_proj.copy_(to_torch(gate_up))
        block.experts.down_proj.copy_(to_torch(np.swapaxes(p["wo"], 1, 2)))


@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
def test_matches_transformers_mixtral_sparse_moe_block(activation):
    torch = required_module("torch")
    mixtral = required_module("transformers.models.mixtral.modeling_mixtral")
    from transformers import MixtralConfig
    cfg = dataclasses.replace(CFG, activation=activation)
    params, x, valid = init(cfg)
    y, _ = apply(cfg, params, x, valid)
    hf = MixtralConfig(hidden_size=cfg.d_model, intermediate_size=cfg.resolved_moe_d_ff, num_local_experts=4,
                       num_experts_per_tok=2, hidden_act=activation)
    block = mixtral.MixtralSparseMoeBlock(hf).eval()
    load_experts(block, params["params"])
    with torch.no_grad():
        ref = block(to_torch(x)).numpy()
    err = float(np.abs(np.asarray(y) - ref).max())
    assert err < 1e-5, err


def test_matches_transformers_qwen2_moe_block_with_shared_expert_and_unnormalised_topk():
    torch = required_module("torch")
    qwen = required_module("transformers.models.qwen2_moe.modeling_qwen2_moe")
    from transformers import Qwen2MoeConfig
    cfg = dataclasses.replace(CFG, shared_expert_d_ff=20, norm_topk_prob=False)
    params, x, valid = init(cfg)
    y, _ = apply(cfg, params, x, valid)
    hf = Qwen2MoeConfig(hidden_size=cfg.d_model, moe_intermediate_size=cfg.resolved_moe_d_ff, num_experts=4,
                        num_experts_per_tok=2, shared_expert_intermediate_size=20, norm_topk_prob=False)
    block = qwen.Qwen2MoeSparseMoeBlock(hf).eval()
    p = params["params"]
    load_experts(block, p)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(block.shared_expert, name).weight.copy_(to_torch(p["shared_expert"][name]["kernel"].T))
        block.shared_expert_gate.weight.copy_(to_torch(p["shared_expert_gate"]["kernel"].T))
        ref = block(to_torch(x)).numpy()
    err = float(np.abs(np.asarray(y) - ref).max())
    assert err < 1e-5, err


def test_param_shapes_and_logical_axes():
    cfg = dataclasses.replace(CFG, shared_expert_d_ff=20)
    boxed = jax.eval_shape(MoEMLP(cfg).init, jax.random.key(0), jnp.zeros((1, 4, 16)), jnp.ones((1, 4), bool))["params"]
    got = {"/".join(str(k.key) for k in path): (tuple(v.value.shape), v.names)
           for path, v in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))[0]}
    assert got == {
        "router/kernel": ((16, 4), ("embed", None)),
        "wi_gate": ((4, 16, 12), ("expert", "embed", "mlp")),
        "wi_up": ((4, 16, 12), ("expert", "embed", "mlp")),
        "wo": ((4, 12, 16), ("expert", "mlp", "embed")),
        "shared_expert/gate_proj/kernel": ((16, 20), ("embed", "mlp")),
        "shared_expert/up_proj/kernel": ((16, 20), ("embed", "mlp")),
        "shared_expert/down_proj/kernel": ((20, 16), ("mlp", "embed")),
        "shared_expert_gate/kernel": ((16, 1), ("embed", None)),
    }


def test_init_std_and_scaled_output_projection():
    cfg = dataclasses.replace(CFG, d_model=64, moe_d_ff=256, n_layers=8, n_experts=8)
    p = nn.unbox(jax.jit(MoEMLP(cfg).init)(jax.random.key(0), jnp.zeros((1, 2, 64)), jnp.ones((1, 2), bool)))["params"]
    # N(0, std) truncated at +-2 std (PyTorch trunc_normal_ / Hugging Face convention): the truncated
    # distribution's std is 0.8796 * std
    std_in, std_out = float(jnp.std(p["wi_gate"])), float(jnp.std(p["wo"]))
    assert abs(std_in - 0.02 * 0.8796) < 0.0005, std_in
    assert abs(std_out - 0.02 * 0.8796 / 4.0) < 0.0002, std_out  # 1/sqrt(2 * n_layers) = 1/4
    assert float(jnp.abs(p["wi_gate"]).max()) <= 2 * 0.02 + 1e-7
    assert float(jnp.abs(p["wo"]).max()) <= 2 * 0.02 / 4.0 + 1e-7


def test_padding_is_excluded_from_aux_and_stats():
    params, x, _ = init(CFG)
    valid = jnp.arange(T)[None, :] < jnp.array([[7], [4]])
    _, aux = apply(CFG, params, x, valid)
    garbage = jnp.where(valid[..., None], x, 1e3 * jnp.sign(x))  # padding content must not matter
    _, aux_garbage = apply(CFG, params, garbage, valid)
    for name in aux:
        assert np.allclose(aux[name], aux_garbage[name], rtol=1e-5, atol=1e-6), name
    assert float(aux["n_valid"]) == 11.0 and float(aux["expert_counts"].sum()) == 22.0, aux


def test_jitter_only_in_training_and_only_with_its_rng():
    cfg = dataclasses.replace(CFG, router_jitter=0.5)
    params, x, valid = init(cfg)
    y_eval, _ = apply(cfg, params, x, valid, deterministic=True)
    y_plain, _ = apply(CFG, params, x, valid)
    assert float(jnp.abs(y_eval - y_plain).max()) == 0.0
    y1, _ = apply(cfg, params, x, valid, deterministic=False, rngs={"jitter": jax.random.key(1)})
    y2, _ = apply(cfg, params, x, valid, deterministic=False, rngs={"jitter": jax.random.key(2)})
    assert float(jnp.abs(y1 - y_plain).max()) > 1e-4 and float(jnp.abs(y1 - y2).max()) > 1e-4
    with pytest.raises(Exception, match="jitter"):
        apply(cfg, params, x, valid, deterministic=False)


def test_jitter_multiplies_the_whole_block_input_by_uniform_noise_in_1_plus_minus_j(monkeypatch):
    # Mixtral: hidden_states *= U(1-j, 1+j) before the router AND the experts. Pin the noise to its upper
    # bound: the jittered layer must then equal the plain layer applied to (1+j) * x.
    cfg = dataclasses.replace(CFG, router_jitter=0.3, shared_expert_d_ff=8)
    params, x, valid = init(cfg)
    seen = {}
    real_uniform = jax.random.uniform

    def pinned(key, shape, dtype, minval, maxval):
        seen.update(minval=minval, maxval=maxval, shape=shape)
        return jnp.full(shape, maxval, dtype)

    monkeypatch.setattr(jax.random, "uniform", pinned)
    jitted.cache_clear()  # trace afresh with the pinned noise
    y, _ = apply(cfg, params, x, valid, deterministic=False, rngs={"jitter": jax.random.key(0)})
    jitted.cache_clear()
    monkeypatch.setattr(jax.random, "uniform", real_uniform)
    y_ref, _ = apply(cfg, params, 1.3 * x, valid)
    assert seen == {"minval": 0.7, "maxval": 1.3, "shape": x.shape}, seen
    err = float(jnp.abs(y - y_ref).max())
    assert err < 1e-5, err


def test_gradients_reach_router_and_every_expert():
    cfg = dataclasses.replace(CFG, shared_expert_d_ff=8)
    params, x, valid = init(cfg)

    def loss(p):
        y, aux = apply(cfg, p, x, valid)
        return jnp.mean(y ** 2) + 0.01 * aux["aux_loss"] + 0.001 * aux["z_loss"]

    g = jax.jit(jax.grad(loss))(params)["params"]
    assert float(jnp.abs(g["router"]["kernel"]).max()) > 0
    for name in ("wi_gate", "wi_up", "wo"):
        per_expert = np.abs(np.asarray(g[name])).reshape(cfg.n_experts, -1).max(-1)
        assert (per_expert > 0).all(), (name, per_expert)
    assert float(jnp.abs(g["shared_expert_gate"]["kernel"]).max()) > 0


def test_bfloat16_compute_keeps_float32_params_and_router():
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    params, x, valid = init(cfg)
    y, aux = apply(cfg, params, x.astype(jnp.bfloat16), valid)
    y32, _ = apply(CFG, params, x, valid)
    assert y.dtype == jnp.bfloat16 and aux["aux_loss"].dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    err = float(jnp.abs(y.astype(jnp.float32) - y32).max())
    assert err < 0.05 * float(jnp.abs(y32).max()), err


def test_capacity_layer_reports_drops_when_capacity_is_small():
    cfg = dataclasses.replace(CFG, moe_dispatch="capacity", capacity_factor=0.25)
    params, x, valid = init(cfg)
    _, aux = apply(cfg, params, x, valid)
    assigned = float(aux["expert_counts"].sum())
    # C = ceil(0.25 * 10 * 2 / 4) = 2 slots x 4 experts per sequence: at most 16 of 40 assignments survive
    assert float(aux["dropped"]) >= assigned - 16, (float(aux["dropped"]), assigned)
