"""Causal attention without a cache skips the key blocks after each query block (`layers.attention.causal_blocks`):
the blocks cover every key a query may see, and blocked attention equals the full masked product in values and
gradients, in the layer and in the whole model, in float32 and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_fixtures import init, random_tokens, row_inputs, tiny_config
from ultrathink_jax.layers import attention
from ultrathink_jax.layers.attention import attention_mask, causal_blocks, grouped_attention
from ultrathink_jax.model import Transformer


@pytest.mark.parametrize("T", [1, 100, 128, 255, 256, 300, 1024, 2048, 4096])
@pytest.mark.parametrize("window", [0, 1, 50, 700])
def test_causal_blocks_cover_every_visible_key(T, window):
    blocks = causal_blocks(T, window)
    assert blocks[0][0] == 0 and blocks[-1][1] == T
    assert all(prev[1] == nxt[0] for prev, nxt in zip(blocks, blocks[1:]))  # the query blocks tile [0, T)
    assert len(blocks) <= attention.CAUSAL_MAX_BLOCKS
    shortest = min(e - a for a, e, _ in blocks)
    assert len(blocks) == 1 or shortest >= attention.CAUSAL_BLOCK_MIN_ROWS or (
        len(blocks) == 2 and shortest >= attention.CAUSAL_HALF_MIN_ROWS)
    for first_q, end_q, first_k in blocks:
        # every query i in the block sees keys (i - window, i]: all inside [first_k, end_q)
        assert first_k <= (max(0, first_q - window + 1) if window else 0)
    if T == 1024 and not window:  # 8 blocks: 9/16 of the query-key products
        assert sum((e - a) * (e - k) for a, e, k in blocks) == 9 * T * T // 16


@pytest.mark.parametrize("T, n_blocks", [(127, 1), (128, 2), (255, 2), (256, 2), (511, 3), (512, 4), (1024, 8),
                                         (4096, 8)])
def test_sequences_from_128_positions_are_cut_at_least_in_halves(T, n_blocks):
    assert len(causal_blocks(T, 0)) == n_blocks


def packed_inputs(B, T, n_heads, n_kv_heads, hd, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, n_heads, hd)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(B, T, n_kv_heads, hd)), dtype) for _ in range(2))
    segments = np.ones((B, T), np.int32)
    segments[1, T // 3:] = 2  # row 1 packs a second document
    segments[1, -3:] = 0  # and ends in padding
    weights = jnp.asarray(rng.normal(size=(B, T, n_heads, hd)), jnp.float32)
    return q, k, v, jnp.asarray(segments), weights


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("window", [0, 6])
def test_blocked_causal_attention_equals_the_full_mask(monkeypatch, dtype, tol, window):
    monkeypatch.setattr(attention, "CAUSAL_BLOCK_MIN_ROWS", 4)  # 19 positions -> 4 uneven blocks
    B, T, hd = 2, 19, 8
    assert len(causal_blocks(T, window)) == 4
    q, k, v, segments, weights = packed_inputs(B, T, 4, 2, hd, dtype)
    mask = attention_mask(jnp.arange(T), jnp.arange(T), segments, segments, window)

    def loss(causal):
        fn = lambda q, k, v: jnp.sum(weights * grouped_attention(q, k, v, mask, hd ** -0.5, causal=causal,
                                                                 sliding_window=window).astype(jnp.float32))
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(q, k, v)

    (blocked, blocked_grads), (full, full_grads) = loss(True), loss(False)
    np.testing.assert_allclose(blocked, full, rtol=tol)
    for name, a, b in zip("qkv", blocked_grads, full_grads):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol,
                                   err_msg=f"d{name}")


def test_blocked_causal_attention_computes_fewer_flops():
    T, hd = 1024, 8
    q, k, v, segments, _ = packed_inputs(2, T, 2, 1, hd, jnp.float32)
    mask = attention_mask(jnp.arange(T), jnp.arange(T), segments, segments, 0)

    def flops(causal):
        fn = jax.jit(lambda q, k, v: grouped_attention(q, k, v, mask, 0.3, causal=causal))
        return fn.lower(q, k, v).compile().cost_analysis()["flops"]

    assert flops(True) < 0.62 * flops(False)  # 9/16 of the score products, plus the blocks' bookkeeping


def test_causal_attention_needs_as_many_keys_as_queries():
    q = jnp.zeros((1, 4, 2, 8))
    k = v = jnp.zeros((1, 6, 1, 8))
    mask = jnp.ones((1, 1, 4, 6), bool)
    with pytest.raises(ValueError, match="causal attention needs as many keys as queries, got 6 keys for 4 queries"):
        grouped_attention(q, k, v, mask, 0.3, causal=True)


@pytest.mark.parametrize("window", [0, 9])
def test_model_logits_and_gradients_are_the_same_with_and_without_blocks(monkeypatch, window):
    cfg = tiny_config(sliding_window=window)
    params = init(cfg)
    segments = np.ones((2, 40), np.int32)
    segments[0, 25:] = 2
    tokens, positions, segment_ids = row_inputs(random_tokens(cfg, (2, 40)), segments)

    def forward_and_grad(max_blocks):
        monkeypatch.setattr(attention, "CAUSAL_BLOCK_MIN_ROWS", 8)
        monkeypatch.setattr(attention, "CAUSAL_MAX_BLOCKS", max_blocks)
        fn = lambda p: Transformer(cfg).apply({"params": p}, tokens, positions, segment_ids)[0]
        logits = jax.jit(fn)(params)
        grads = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(fn(p)))))(params)
        return logits, grads

    (blocked, blocked_grads), (full, full_grads) = forward_and_grad(5), forward_and_grad(1)
    np.testing.assert_allclose(blocked, full, atol=2e-5)
    worst = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b))),
                                             blocked_grads, full_grads)))
    assert worst < 1e-5, f"largest gradient difference {worst:.3g} of the gradient's largest entry"
