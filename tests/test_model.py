"""Behaviour of the dense decoder: shapes, masking, GQA, RoPE, initialisation, KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_fixtures import init, jitted_apply, logits_of, random_tokens, row_inputs, tiny_config
from ultrathink_jax.layers.rotary import apply_rope, forward_rope_tables, rope_tables
from ultrathink_jax.model import Transformer, init_cache, layer_plan


def test_logits_shape_and_dtype():
    cfg = tiny_config()
    logits = logits_of(cfg, init(cfg), random_tokens(cfg, (3, 10)))
    assert logits.shape == (3, 10, cfg.vocab_size) and logits.dtype == jnp.float32


@pytest.mark.parametrize("sliding_window", [0, 3])
def test_changing_a_later_token_leaves_earlier_logits_unchanged(sliding_window):
    cfg = tiny_config(sliding_window=sliding_window)
    params = init(cfg)
    tokens = random_tokens(cfg, (1, 12))
    changed = tokens.copy()
    changed[0, 7] = (changed[0, 7] + 1) % cfg.vocab_size
    a, b = logits_of(cfg, params, tokens), logits_of(cfg, params, changed)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert float(jnp.abs(a[:, 7:] - b[:, 7:]).max()) > 1e-4, "a changed token must affect its own logits"


def test_packed_documents_match_each_document_alone():
    cfg = tiny_config()
    params = init(cfg)
    doc_a, doc_b = random_tokens(cfg, (1, 7), seed=2), random_tokens(cfg, (1, 5), seed=3)
    packed = np.concatenate([doc_a, doc_b], axis=1)
    segments = np.array([[1] * 7 + [2] * 5])
    out = logits_of(cfg, params, packed, segments)
    np.testing.assert_allclose(out[:, :7], logits_of(cfg, params, doc_a), atol=1e-5)
    np.testing.assert_allclose(out[:, 7:], logits_of(cfg, params, doc_b), atol=1e-5)


def test_sliding_window_limits_what_a_token_sees():
    cfg = tiny_config(sliding_window=4)
    params = init(cfg)
    tokens = random_tokens(cfg, (1, 12))
    changed = tokens.copy()
    changed[0, 2] = (changed[0, 2] + 1) % cfg.vocab_size
    a, b = logits_of(cfg, params, tokens), logits_of(cfg, params, changed)
    # Two layers widen the receptive field to 2 * (window - 1) = 6 positions: token 2 reaches up to position 8.
    assert float(jnp.abs(a[:, 2:9] - b[:, 2:9]).max()) > 1e-5
    np.testing.assert_array_equal(a[:, 9:], b[:, 9:])


def test_grouped_query_attention_equals_multi_head_with_repeated_kv():
    gqa = tiny_config(n_heads=4, n_kv_heads=2)
    mha = tiny_config(n_heads=4, n_kv_heads=4)
    params = init(gqa)
    group = gqa.n_heads // gqa.n_kv_heads
    mha_params = jax.tree.map(lambda x: x, params)
    for name in ("k_proj", "v_proj"):
        kernel = params["layers"]["block_0"]["self_attn"][name]["kernel"]  # [layers, D, n_kv_heads, head_dim]
        # Query head h reads KV head h // group, so each KV head is repeated `group` times in a row.
        mha_params["layers"]["block_0"]["self_attn"][name]["kernel"] = jnp.repeat(kernel, group, axis=2)
    tokens = random_tokens(gqa, (2, 9))
    np.testing.assert_allclose(logits_of(gqa, params, tokens), logits_of(mha, mha_params, tokens), atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(pos_q, pos_k):
        cq, sq = rope_tables(jnp.array([[pos_q]]), 16, 10000.0)
        ck, sk = rope_tables(jnp.array([[pos_k]]), 16, 10000.0)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_rope_pairs_dimension_i_with_i_plus_half():
    x = jnp.zeros((1, 1, 1, 8)).at[..., 1].set(1.0)
    cos, sin = rope_tables(jnp.array([[1]]), 8, 10000.0)
    rotated = apply_rope(x, cos, sin)[0, 0, 0]
    nonzero = set(np.flatnonzero(np.abs(np.asarray(rotated)) > 1e-6).tolist())
    assert nonzero == {1, 5}, nonzero


@pytest.mark.parametrize("positions", [[[0, 5, 63], [1, 2, 3]], [[0, 64, 900]], [[-3, 0, 7]]],
                         ids=["in table", "past the table", "negative"])
def test_forward_rope_tables_equal_the_direct_ones_for_any_position(positions):
    positions = jnp.asarray(positions, jnp.int32)
    got = jax.jit(lambda p: forward_rope_tables(p, 16, 10000.0, 64))(positions)
    want = jax.jit(lambda p: rope_tables(p, 16, 10000.0))(positions)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)


def test_rope_tables_are_computed_once_per_forward_not_per_layer_on_cpu():
    """XLA:CPU fused cos/sin into every consumer: the compiled forward + backward recomputed them in each layer."""
    def cosines(n_layers):
        cfg = tiny_config(n_layers=n_layers)
        params = init(cfg)
        tokens, positions, segment_ids = row_inputs(random_tokens(cfg, (2, 16)))
        loss = lambda p: jnp.sum(Transformer(cfg).apply({"params": p}, tokens, positions, segment_ids)[0])
        return jax.jit(jax.grad(loss)).lower(params).compile().as_text().count(" cosine(")

    assert cosines(2) == cosines(4) > 0


def test_initialisation_matches_the_original_recipe():
    cfg = tiny_config(d_model=256, d_ff=512, n_layers=8, n_heads=4, n_kv_heads=4, vocab_size=2048)
    params = init(cfg)
    q = np.asarray(params["layers"]["block_0"]["self_attn"]["q_proj"]["kernel"])
    o = np.asarray(params["layers"]["block_0"]["self_attn"]["o_proj"]["kernel"])
    down = np.asarray(params["layers"]["block_0"]["mlp"]["down_proj"]["kernel"])
    emb = np.asarray(params["embed_tokens"]["embedding"])
    # A normal truncated at +-2 sigma has std 0.8796 sigma.
    assert q.std() == pytest.approx(0.02 * 0.8796, rel=0.03) and np.abs(q).max() <= 0.04 + 1e-7
    scaled = 0.02 / np.sqrt(2 * cfg.n_layers)
    for w in (o, down):
        assert w.std() == pytest.approx(scaled * 0.8796, rel=0.03) and np.abs(w).max() <= 2 * scaled + 1e-7
    assert emb.std() == pytest.approx(0.02, rel=0.03) and np.abs(emb).max() > 0.04  # untruncated normal
    assert np.all(np.asarray(params["norm"]["scale"]) == 1.0)


def test_tied_embeddings_have_no_lm_head():
    cfg = tiny_config(tie_embeddings=True)
    params = init(cfg)
    assert "lm_head" not in params
    x = logits_of(cfg, params, random_tokens(cfg, (1, 4)))
    assert np.isfinite(np.asarray(x)).all()


def test_layer_plan_places_every_layer_once():
    for kw in [dict(), dict(n_experts=4, moe_every=2), dict(n_experts=4, moe_first_dense=3, moe_every=2),
               dict(n_experts=4, moe_first_dense=1), dict(n_experts=4, moe_every=3)]:
        cfg = tiny_config(n_layers=7, **kw)
        placed = [(s.layer_index(u, b), moe) for s in layer_plan(cfg) for u in range(s.n_units)
                  for b, moe in enumerate(s.unit)]
        assert sorted(i for i, _ in placed) == list(range(7)), kw
        assert all(moe == cfg.is_moe_layer(i) for i, moe in placed), kw


@pytest.mark.parametrize("sliding_window, scan_unroll", [(0, 0), (5, 0), (0, 1)])
def test_kv_cached_decoding_equals_full_recompute(sliding_window, scan_unroll):
    cfg = tiny_config(sliding_window=sliding_window, scan_unroll=scan_unroll)  # 1: a rolled scan carries the cache
    params = init(cfg)
    apply = jitted_apply(cfg)
    tokens = random_tokens(cfg, (2, 12))
    full = apply(params, *row_inputs(tokens))[0]
    cache = init_cache(cfg, batch=2, max_len=16)
    prompt = 7
    tok, pos, seg = row_inputs(tokens[:, :prompt])
    step_logits, _, cache = apply(params, tok, pos, seg, cache)
    outs = [step_logits]
    for t in range(prompt, 12):
        tok, seg = jnp.asarray(tokens[:, t:t + 1]), jnp.ones((2, 1), jnp.int32)
        step_logits, _, cache = apply(params, tok, jnp.full((2, 1), t), seg, cache)
        outs.append(step_logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


@pytest.mark.parametrize("scan_unroll", [1, 2])
def test_scan_unroll_gives_the_same_logits_and_gradients(scan_unroll):
    auto, rolled = tiny_config(n_layers=4), tiny_config(n_layers=4, scan_unroll=scan_unroll)
    params = init(auto)
    raw = random_tokens(auto, (2, 8))
    tokens = row_inputs(raw)

    def loss(cfg):
        return lambda p: jnp.sum(Transformer(cfg).apply({"params": p}, *tokens)[0] ** 2)

    # auto on CPU = every unit in one iteration: no while loop left; a partial unroll keeps the loop
    assert ("while" in jax.jit(loss(rolled)).lower(params).as_text()) and (
        "while" not in jax.jit(loss(auto)).lower(params).as_text())
    np.testing.assert_allclose(logits_of(rolled, params, raw), logits_of(auto, params, raw), atol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.jit(jax.grad(loss(auto)))(params)),
                    jax.tree.leaves(jax.jit(jax.grad(loss(rolled)))(params))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_policies_give_the_same_gradients(policy):
    base, remat = tiny_config(), tiny_config(remat_policy=policy)
    params = init(base)
    tokens = row_inputs(random_tokens(base, (2, 8)))

    def grads(cfg):
        return jax.jit(jax.grad(lambda p: jnp.sum(Transformer(cfg).apply({"params": p}, *tokens)[0] ** 2)))(params)

    for a, b in zip(jax.tree.leaves(grads(base)), jax.tree.leaves(grads(remat))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-6)
