"""Router semantics and auxiliary losses against NumPy references and transformers' own functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import required_module
from ultrathink_jax.moe import router

E, K = 6, 2


def np_softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(size=(3, 5, E)).astype(np.float32) * 2


@pytest.fixture
def valid():
    v = np.ones((3, 5), bool)
    v[0, 3:] = False
    v[2, 1] = False
    return v


def test_route_is_softmax_over_all_experts_then_topk_then_renormalised(logits):
    r = router.route(jnp.asarray(logits), K, norm_topk_prob=True)
    probs = np_softmax(logits.astype(np.float64))
    idx = np.argsort(-probs, axis=-1)[..., :K]
    w = np.take_along_axis(probs, idx, -1)
    np.testing.assert_allclose(r.probs, probs, atol=1e-6)
    np.testing.assert_array_equal(r.expert_index, idx)
    np.testing.assert_allclose(r.expert_weight, w / w.sum(-1, keepdims=True), atol=1e-6)


def test_route_keeps_raw_topk_probabilities_without_norm_topk_prob(logits):
    r = router.route(jnp.asarray(logits), K, norm_topk_prob=False)
    probs = np_softmax(logits.astype(np.float64))
    w = np.sort(probs, -1)[..., ::-1][..., :K]
    np.testing.assert_allclose(r.expert_weight, w, atol=1e-6)
    assert float(r.expert_weight.sum(-1).max()) < 1.0


def test_route_computes_in_float32_even_for_bfloat16_logits(logits):
    r = router.route(jnp.asarray(logits, jnp.bfloat16), K)
    assert r.probs.dtype == jnp.float32 and r.expert_weight.dtype == jnp.float32


def np_switch_loss(logits, valid, k):
    probs = np_softmax(logits.astype(np.float64)).reshape(-1, E)
    m = valid.reshape(-1).astype(np.float64)
    top = np.argsort(-probs, -1)[:, :k]
    f = np.zeros(E)
    for t in range(probs.shape[0]):
        for e in top[t]:
            f[e] += m[t]
    f /= m.sum()
    p = (probs * m[:, None]).sum(0) / m.sum()
    return E * np.sum(f * p)


def layer_aux(logits, valid):
    r = router.route(jnp.asarray(logits), K)
    v = jnp.asarray(valid)
    counts, prob_sum = router.expert_counts(r.expert_index, v, E), router.router_prob_sum(r.probs, v)
    return counts, prob_sum, jnp.sum(v.astype(jnp.float32))


def test_load_balance_loss_matches_numpy_switch_formula_excluding_padding(logits, valid):
    loss = router.load_balance_loss(*layer_aux(logits, valid))
    ref = np_switch_loss(logits, valid, K)
    assert abs(float(loss) - ref) < 1e-5, (float(loss), ref)


def test_pooled_load_balance_loss_equals_transformers_aux_loss_over_layers(logits, valid):
    torch = required_module("torch")
    mixtral = required_module("transformers.models.mixtral.modeling_mixtral")
    layers = [logits, logits[::-1] * 0.5 + 1.0]  # two MoE layers, same padding
    per_layer = [layer_aux(l, valid) for l in layers]
    aux_moe = {name: jnp.stack([p[i] for p in per_layer])
               for i, name in enumerate(("expert_counts", "router_prob_sum", "n_valid"))}
    ours = router.pooled_load_balance_loss(aux_moe)
    theirs = mixtral.load_balancing_loss_func(
        tuple(torch.from_numpy(l.reshape(-1, E).copy()) for l in layers), E, K,
        attention_mask=torch.from_numpy(valid.astype(np.int64)))
    assert abs(float(ours) - float(theirs)) < 1e-5, (float(ours), float(theirs))


def test_balanced_router_scores_k():
    # uniform probabilities and a perfectly even top-k spread: f_e = k/E, P_e = 1/E -> E * E * k/E^2 = k
    counts = jnp.full((E,), 4.0 * K / E * 3)
    loss = router.load_balance_loss(counts, jnp.full((E,), 12.0 / E), jnp.asarray(12.0))
    assert abs(float(loss) - K) < 1e-6, float(loss)


def test_z_loss_is_mean_squared_logsumexp_over_valid_tokens(logits, valid):
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    ref = (lse ** 2)[valid].mean()
    got = float(router.z_loss(jnp.asarray(logits), jnp.asarray(valid)))
    assert abs(got - ref) < 1e-4 * ref, (got, ref)


def test_entropy_sum_is_sum_of_per_token_entropies_in_nats(logits, valid):
    p = np_softmax(logits.astype(np.float64))
    ref = -(p * np.log(p)).sum(-1)[valid].sum()
    got = float(router.entropy_sum(router.route(jnp.asarray(logits), K).probs, jnp.asarray(valid)))
    assert abs(got - ref) < 1e-4, (got, ref)


def test_all_padding_batch_gives_zero_losses_not_nan(logits):
    valid = np.zeros(logits.shape[:2], bool)
    loss = router.load_balance_loss(*layer_aux(logits, valid))
    z = router.z_loss(jnp.asarray(logits), jnp.asarray(valid))
    assert float(loss) == 0.0 and float(z) == 0.0, (float(loss), float(z))


def test_load_balance_gradient_flows_through_probabilities_only(logits, valid):
    def loss(l):
        return router.load_balance_loss(*layer_aux(l, valid))
    g = jax.jit(jax.grad(loss))(jnp.asarray(logits))
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0
    assert float(jnp.abs(g[~valid]).max()) == 0.0, "padding tokens must not receive aux-loss gradient"


def test_moe_loss_weights_pooled_load_balance_and_z_loss(logits, valid):
    from ultrathink_jax.config import ModelConfig
    cfg = ModelConfig(n_experts=E, router_aux_loss_weight=0.5, router_z_loss_weight=0.25,
                      router_aux_loss_per_layer=False)
    layers = [logits, logits * 0.3]
    per_layer = [layer_aux(l, valid) for l in layers]
    aux_moe = {name: jnp.stack([p[i] for p in per_layer])
               for i, name in enumerate(("expert_counts", "router_prob_sum", "n_valid"))}
    z = [router.z_loss(jnp.asarray(l), jnp.asarray(valid)) for l in layers]
    aux_moe["z_loss_sum"] = jnp.stack(z) * aux_moe["n_valid"]
    expected = 0.5 * float(router.pooled_load_balance_loss(aux_moe)) + 0.25 * (float(z[0]) + float(z[1])) / 2
    got = float(router.moe_loss(aux_moe, cfg))
    assert abs(got - expected) < 1e-5, (got, expected)


def test_moe_loss_per_layer_default_averages_the_layers_own_losses(logits, valid):
    from ultrathink_jax.config import ModelConfig
    per_layer_cfg = ModelConfig(n_experts=E, router_aux_loss_weight=0.5, router_z_loss_weight=0.0)
    assert per_layer_cfg.router_aux_loss_per_layer, "the per-layer loss is the default"
    pooled_cfg = ModelConfig(n_experts=E, router_aux_loss_weight=0.5, router_z_loss_weight=0.0,
                             router_aux_loss_per_layer=False)
    # Two layers routing differently (the second reverses the expert order): pooling mixes their statistics.
    stats = [layer_aux(l, valid) for l in (logits, logits[..., ::-1])]
    aux_moe = {name: jnp.stack([s[i] for s in stats])
               for i, name in enumerate(("expert_counts", "router_prob_sum", "n_valid"))}
    aux_moe["aux_loss"] = jnp.stack([router.load_balance_loss(*s) for s in stats])
    aux_moe["z_loss_sum"] = jnp.zeros(2)
    per_layer = float(router.moe_loss(aux_moe, per_layer_cfg))
    assert per_layer == pytest.approx(0.5 * float(jnp.mean(aux_moe["aux_loss"])), rel=1e-6)
    assert per_layer != pytest.approx(float(router.moe_loss(aux_moe, pooled_cfg)), rel=1e-3)


def test_selection_bias_changes_which_experts_are_chosen_but_not_their_weights(logits):
    x = jnp.asarray(logits)
    plain = router.route(x, K)
    bias = jnp.zeros(E).at[E - 1].set(10.0)  # large enough to force expert E-1 into every token's top-k
    biased = router.route(x, K, True, bias)
    assert bool(jnp.all(jnp.any(biased.expert_index == E - 1, axis=-1)))
    assert not bool(jnp.all(jnp.any(plain.expert_index == E - 1, axis=-1)))
    chosen = jnp.take_along_axis(plain.probs, biased.expert_index, axis=-1)
    np.testing.assert_allclose(biased.expert_weight, chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)
    g = jax.grad(lambda b: jnp.sum(router.route(x, K, True, b).expert_weight ** 2))(bias)
    assert float(jnp.abs(g).max()) == 0.0, "the selection bias must get no gradient"


def test_selection_bias_update_moves_toward_balance_from_the_old_bias():
    from ultrathink_jax.config import ModelConfig
    cfg = ModelConfig(n_layers=2, n_experts=4, router_bias_update_rate=0.01)
    path = router.selection_bias_path(cfg)
    old = {"moe_units": {"block_0": {"moe": {"selection_bias": jnp.zeros((2, 4)), "wo": jnp.ones(3)}}}}
    new = {"moe_units": {"block_0": {"moe": {"selection_bias": jnp.full((2, 4), 5.0), "wo": jnp.zeros(3)}}}}
    counts = jnp.asarray([[10.0, 2.0, 2.0, 2.0], [4.0, 4.0, 4.0, 4.0]])
    out = router.update_selection_bias(old, new, counts, cfg)
    np.testing.assert_allclose(out["moe_units"]["block_0"]["moe"]["selection_bias"],
                               [[-0.01, 0.01, 0.01, 0.01], [0.0, 0.0, 0.0, 0.0]])  # the optimizer's 5.0 is ignored
    np.testing.assert_array_equal(out["moe_units"]["block_0"]["moe"]["wo"], jnp.zeros(3))
    assert path == ("moe_units", "block_0", "moe", "selection_bias")
    off = ModelConfig(n_layers=2, n_experts=4)
    assert router.update_selection_bias(old, new, counts, off) is new
