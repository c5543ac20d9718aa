"""Dropless and capacity dispatch against a per-token loop over experts, and the exact drop rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultrathink_jax.activations import ACTIVATION_FNS
from ultrathink_jax.moe import dispatch

B, T, D, F, E, K = 2, 12, 8, 16, 4, 2


def np_silu(x):
    return x / (1 + np.exp(-x))


def problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    index = np.stack([rng.choice(E, K, replace=False) for _ in range(B * T)]).reshape(B, T, K).astype(np.int32)
    weight = rng.uniform(0.1, 1.0, size=(B, T, K)).astype(np.float32)
    wi_gate, wi_up = (rng.normal(size=(E, D, F)).astype(np.float32) * 0.3 for _ in range(2))
    wo = rng.normal(size=(E, F, D)).astype(np.float32) * 0.3
    return x, index, weight, wi_gate, wi_up, wo


def per_token_loop(x, index, weight, wi_gate, wi_up, wo, kept=None):
    y = np.zeros(x.shape, np.float64)
    for b in range(B):
        for t in range(T):
            for j in range(K):
                if kept is not None and not kept[b, t, j]:
                    continue
                e = index[b, t, j]
                h = np_silu(x[b, t] @ wi_gate[e]) * (x[b, t] @ wi_up[e])
                y[b, t] += weight[b, t, j] * (h @ wo[e])
    return y


def run(fn, x, index, weight, wi_gate, wi_up, wo, valid=None, **kw):
    valid = np.ones((B, T), bool) if valid is None else valid
    return fn(*map(jnp.asarray, (x, index, weight, valid, wi_gate, wi_up, wo)), jax.nn.silu, **kw)


def test_dropless_equals_per_token_loop():
    p = problem()
    y, dropped = run(dispatch.dropless, *p)
    err = float(np.abs(np.asarray(y) - per_token_loop(*p)).max())
    assert err < 1e-5, err
    assert float(dropped) == 0.0


def test_dropless_handles_an_expert_that_receives_no_token():
    x, index, weight, *w = problem()
    index = np.where(index == 3, 2, index)  # expert 3 unused; duplicate (2, 2) pairs are still valid work
    y, _ = run(dispatch.dropless, x, index, weight, *w)
    err = float(np.abs(np.asarray(y) - per_token_loop(x, index, weight, *w)).max())
    assert err < 1e-5, err


def test_capacity_equals_dropless_when_nothing_drops():
    p = problem()
    y_drop, _ = run(dispatch.dropless, *p)
    y_cap, dropped = run(dispatch.capacity, *p, capacity_factor=float(E))  # C = T*k slots: nothing can drop
    err = float(jnp.abs(y_cap - y_drop).max())
    assert err < 1e-5 and float(dropped) == 0.0, (err, float(dropped))


def expected_kept(index, valid, slots):
    """GShard priority: all first choices in token order, then all second choices; C slots per expert."""
    kept = np.zeros(index.shape, bool)
    for b in range(B):
        used = np.zeros(E, int)
        for j in range(K):
            for t in range(T):
                e = index[b, t, j]
                if valid[b, t] and used[e] < slots:
                    used[e] += 1
                    kept[b, t, j] = True
    return kept


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_capacity_drops_exactly_the_overflow_assignments(capacity_factor):
    x, index, weight, *w = problem(1)
    index[0, :, 0] = 1  # every first choice of sequence 0 wants expert 1 -> heavy overflow
    index[0, :, 1] = np.where(np.arange(T) % 2 == 0, 0, 2)
    valid = np.ones((B, T), bool)
    valid[1, -3:] = False
    slots = dispatch.capacity_slots(T, K, E, capacity_factor)
    kept = expected_kept(index, valid, slots)
    y, dropped = run(dispatch.capacity, x, index, weight, *w, valid=valid, capacity_factor=capacity_factor)
    ref = per_token_loop(x, index, weight, *w, kept=kept)
    err = float(np.abs(np.asarray(y)[valid] - ref[valid]).max())
    n_dropped = int((~kept & valid[..., None]).sum())
    assert err < 1e-5, err
    assert int(dropped) == n_dropped and n_dropped > 0, (int(dropped), n_dropped)


def test_capacity_padding_takes_no_slot():
    x, index, weight, *w = problem(2)
    index[:, :, 0] = 0
    index[:, :, 1] = 1
    valid = np.zeros((B, T), bool)
    valid[:, -2:] = True  # only the last two tokens are real; padding before them must not fill expert 0
    y, dropped = run(dispatch.capacity, x, index, weight, *w, valid=valid, capacity_factor=0.5)  # C = 3
    ref = per_token_loop(x, index, weight, *w)
    err = float(np.abs(np.asarray(y)[valid] - ref[valid]).max())
    assert err < 1e-5 and float(dropped) == 0.0, (err, float(dropped))


def test_capacity_slots_rounds_up_and_never_is_zero():
    assert dispatch.capacity_slots(10, 2, 8, 1.25) == 4  # ceil(3.125)
    assert dispatch.capacity_slots(1, 1, 64, 0.01) == 1


@pytest.mark.parametrize("name", ["gelu", "gelu_pytorch_tanh"])
def test_both_dispatches_use_the_given_activation(name):
    x, index, weight, *w = problem(3)
    act = ACTIVATION_FNS[name]
    valid = jnp.ones((B, T), bool)
    args = (jnp.asarray(x), jnp.asarray(index), jnp.asarray(weight), valid, *map(jnp.asarray, w), act)
    y_drop, _ = dispatch.dropless(*args)
    y_cap, _ = dispatch.capacity(*args, capacity_factor=float(E))
    y_silu, _ = dispatch.dropless(*args[:-1], jax.nn.silu)
    assert float(jnp.abs(y_cap - y_drop).max()) < 1e-5
    assert float(jnp.abs(y_silu - y_drop).max()) > 1e-3, "activation must change the output"


@pytest.mark.parametrize("fn", ["dropless", "capacity"])
def test_gradients_reach_every_expert_weight_and_the_combine_weights(fn):
    x, index, weight, wi_gate, wi_up, wo = map(jnp.asarray, problem(4))
    kw = {"capacity_factor": float(E)} if fn == "capacity" else {}

    def loss(weight, wi_gate, wi_up, wo):
        y, _ = getattr(dispatch, fn)(x, index, weight, jnp.ones((B, T), bool), wi_gate, wi_up, wo, jax.nn.silu, **kw)
        return jnp.sum(y ** 2)

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(weight, wi_gate, wi_up, wo)
    for name, g in zip(("weight", "wi_gate", "wi_up", "wo"), grads):
        per_expert = np.abs(np.asarray(g)).reshape(g.shape[0], -1).max(-1)
        assert np.isfinite(np.asarray(g)).all() and (per_expert > 0).all(), (name, per_expert)


# tiled at tile 5: several partial tiles; at 64: one tile for all
@pytest.mark.parametrize("impl, tile", [("tiled", 5), ("tiled", 64), ("gather", 64), ("dense", 64)])
def test_cpu_grouped_matmuls_equal_ragged_dot_in_value_and_gradient(monkeypatch, impl, tile):
    monkeypatch.setattr(dispatch, "GROUP_TILE", tile)
    x, index, weight, *w = problem(seed=3)
    index = np.where(index == 1, 0, index)  # uneven groups and an empty expert

    def loss(impl, x, weight, *w):
        y = dispatch._dropless_local(x, jnp.asarray(index), weight, *w, jax.nn.silu, impl=impl)
        return jnp.sum(y * jnp.cos(y)), y

    outs = {i: jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True)(i, x, weight, *w)
            for i in (impl, "ragged_dot")}
    (_, y_cpu), g_cpu = outs[impl]
    (_, y_ragged), g_ragged = outs["ragged_dot"]
    np.testing.assert_allclose(y_cpu, y_ragged, atol=1e-5)
    for a, b in zip(g_cpu, g_ragged):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_grouped_matmul_impl_on_cpu_gathers_up_to_e_assignments_then_runs_all_experts_then_tiles():
    assert dispatch.grouped_matmul_impl(E, E, K) == "gather"
    assert dispatch.grouped_matmul_impl(E + 1, E, K) == "dense"
    # dense multiplies tokens x E rows, tiled assignments + E x min(GROUP_TILE, assignments)
    tokens = [n for n in range(1, 2000) if n * E > dispatch.DENSE_ROWS_RATIO * (n * K + E * dispatch.GROUP_TILE)][0]
    assert dispatch.grouped_matmul_impl((tokens - 1) * K, E, K) == "dense"
    assert dispatch.grouped_matmul_impl(tokens * K, E, K) == "tiled"


@pytest.mark.parametrize("tokens, impl", [(1, "gather"), (2, "dense")])  # B x tokens x k = 4 (<= E = 4) or 8
def test_dropless_at_decode_shapes_runs_without_sorting_and_equals_the_loop(monkeypatch, tokens, impl):
    x, index, weight, *w = problem(seed=5)
    x, index, weight = x[:, :tokens], index[:, :tokens], weight[:, :tokens]
    picked = []
    real = dispatch.grouped_matmul_impl
    monkeypatch.setattr(dispatch, "grouped_matmul_impl", lambda *shape: picked.append(real(*shape)) or picked[-1])
    args = (x, index, weight, np.ones((B, tokens), bool), *w)
    run = jax.jit(lambda *a: dispatch.dropless(*a, jax.nn.silu))
    y, dropped = run(*args)
    assert picked == [impl], picked
    assert " sort[" not in str(jax.make_jaxpr(run)(*args)), "the decode shapes must not sort"
    ref = np.zeros(x.shape)
    for b in range(B):
        for t in range(tokens):
            for j in range(K):
                e = index[b, t, j]
                h = np_silu(x[b, t] @ w[0][e]) * (x[b, t] @ w[1][e])
                ref[b, t] += weight[b, t, j] * (h @ w[2][e])
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
    assert float(dropped) == 0.0
