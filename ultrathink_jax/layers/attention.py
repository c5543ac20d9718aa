"""Grouped-query self-attention with rotary embeddings and an optional functional KV cache."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from ultrathink_jax.config import ModelConfig
from ultrathink_jax.layers.init import residual_out_init, weight_init
from ultrathink_jax.layers.linear import Linear, transposed_result, untransposed
from ultrathink_jax.layers.rotary import apply_rope

NEG_INF = -1e30  # finite: a fully masked row (never produced for real tokens) stays NaN-free


def attention_mask(q_index, kv_index, q_segment_ids, kv_segment_ids, sliding_window: int):
    """Boolean [B, 1, T, S]: query i sees key j iff same segment, j <= i and (window) i - window < j.

    Indices are absolute positions in the row (or KV cache), so one function serves training, prefill and decode.
    Padding (segment 0) only sees padding, which keeps its softmax finite and never leaks into real tokens.
    """
    visible = kv_index[None, :] <= q_index[:, None]
    if sliding_window:
        visible &= kv_index[None, :] > q_index[:, None] - sliding_window
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return (visible[None] & same_segment)[:, None]


def mask_bias(mask):
    """Boolean mask -> additive float32 bias (0 visible, -1e30 hidden), built once per forward, outside the layer
    scan, so each layer adds it instead of selecting through the mask."""
    return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


# Causal attention without a cache skips the key blocks after each query block: a block of queries [a, e) sees keys
# [0, e) only (and, with a window w, from a - w + 1), so about half the query-key products are never computed. At
# most 8 blocks of at least 128 rows: smaller blocks cost more in per-matmul overhead than they save. Only 128-255
# positions are cut in two halves of at least 64 rows (3/4 of the products), where the halves still pay for their
# overhead. Measured in BENCHMARKS.md, "Training step: where the time goes", rounds 8 and 11.
CAUSAL_BLOCK_MIN_ROWS = 128
CAUSAL_MAX_BLOCKS = 8
CAUSAL_HALF_MIN_ROWS = 64


def causal_blocks(T: int, sliding_window: int) -> list[tuple[int, int, int]]:
    """(first query, end query, first key) of each query block of causal attention over T positions; the block's
    keys end where its queries do."""
    n = T // CAUSAL_BLOCK_MIN_ROWS
    if n < 2 and T >= 2 * CAUSAL_HALF_MIN_ROWS:
        n = 2
    n = max(1, min(CAUSAL_MAX_BLOCKS, n))
    bounds = [i * T // n for i in range(n + 1)]
    return [(a, e, max(0, a - sliding_window + 1) if sliding_window else 0) for a, e in zip(bounds, bounds[1:])]


def grouped_attention(q, k, v, mask, scale, causal: bool = False, sliding_window: int = 0):
    """Softmax attention for the XLA path: q [B, T, H, hd], k/v [B, S, K, hd], mask [B, 1, T, S] boolean or an
    additive float bias. Computed heads-major, as batched matmuls over (B, K): the G = H / K query heads sharing a KV
    head are stacked along the query axis (GQA without repeating K/V), so each matmul is [G*T, hd] x [hd, S] in the
    layout XLA:CPU's batched matmul wants (fewer layout copies than contracting [B, T, K, G, hd] in place). Scores
    and softmax are float32. `causal`: queries and keys are the same T positions and `mask` hides every later key
    (and, with `sliding_window`, every key that far back), so the hidden blocks are not computed (`causal_blocks`)."""
    B, T, H, hd = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    if causal and S != T:
        raise ValueError(f"causal attention needs as many keys as queries, got {S} keys for {T} queries")
    # float32 (the CPU training path) avoids two scores-sized broadcasts that XLA:CPU would materialise, because it
    # fuses elementwise ops into its matmuls only with full-size operands: the scale goes on q ([T, hd] per head)
    # instead of the [T, S] scores, and the softmax is normalised after the PV matmul (as flash attention does), so
    # 1 / sum divides [T, hd]. Other dtypes keep the textbook order: an extra bf16 rounding of q or of the
    # unnormalised probabilities moves bf16 logits measurably (parity_tests/test_jax_bf16.py).
    fast = q.dtype == jnp.float32
    q = (q * scale if fast else q).reshape(B, T, K, G, hd).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, hd]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, hd]
    bias = mask if jnp.issubdtype(mask.dtype, jnp.floating) else mask_bias(mask)
    blocks = causal_blocks(T, sliding_window) if causal else [(0, T, 0)]
    outs = []
    for first_q, end_q, first_k in blocks:
        end_k = end_q if causal else S
        q_block = q[:, :, :, first_q:end_q].reshape(B, K, G * (end_q - first_q), hd)
        k_block, v_block = k[:, :, first_k:end_k], v[:, :, first_k:end_k]
        bias_block = bias[:, :, first_q:end_q, first_k:end_k]
        if fast:
            out = softmax_attention_f32(q_block, k_block, v_block, bias_block)
        else:
            t, s = end_q - first_q, end_k - first_k
            scores = jnp.einsum("bkqd,bksd->bkqs", q_block, k_block, preferred_element_type=jnp.float32)
            probs = jax.nn.softmax((scores * scale).reshape(B, K, G, t, s) + bias_block[:, :, None], axis=-1)
            out = jnp.einsum("bkqs,bksd->bkqd", probs.reshape(B, K, G * t, s).astype(v.dtype), v_block)
        outs.append(out.reshape(B, K, G, end_q - first_q, hd))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)


def _exp_scores(q, k, bias):
    """exp(scores - row max) [B, K, G*T, S] and the row sums [B, K, G*T, 1]; q already scaled."""
    B, K, GT, _ = q.shape
    T, S = bias.shape[2], k.shape[2]
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k).reshape(B, K, GT // T, T, S) + bias[:, :, None]
    e = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True))).reshape(B, K, GT, S)
    return e, e.sum(-1, keepdims=True)


@jax.custom_vjp
def softmax_attention_f32(q, k, v, bias):
    """softmax(q k^T + bias) v, heads-major: q [B, K, G*T, hd] (scaled), k/v [B, K, S, hd], bias [B, 1, T, S] (not
    differentiated). The backward is written out (flash attention's: dS = P * (dP - rowsum(dO * O))) so that every
    matmul in it has untransposed operands on CPU (`layers.linear.untransposed`)."""
    e, total = _exp_scores(q, k, bias)
    return jnp.einsum("bkqs,bksd->bkqd", e, v) / total


def _softmax_attention_fwd(q, k, v, bias):
    e, total = _exp_scores(q, k, bias)
    inv = 1.0 / total
    out = jnp.einsum("bkqs,bksd->bkqd", e, v) * inv
    return out, (q, k, v, e, inv, out, bias)


def _softmax_attention_bwd(residuals, d_out):
    q, k, v, e, inv, out, bias = residuals
    p = e * inv
    # dV = P^T dO and dK = dS^T Q contract the scores' row axis. They are computed transposed, dV^T = dO^T P, so the
    # transposes XLA:CPU needs (`untransposed`, `transposed_result`) are of the small [G*T, hd] and [hd, S] operands
    # and results, not of the [G*T, S] scores (measured: BENCHMARKS.md, train profile round 8).
    dv = transposed_result(jnp.einsum("bkdq,bkqs->bkds", untransposed(d_out), p))
    dp = jnp.einsum("bkqd,bksd->bkqs", d_out, v)
    ds = p * (dp - jnp.sum(d_out * out, -1, keepdims=True))
    dq = jnp.einsum("bkqs,bksd->bkqd", ds, k)
    dk = transposed_result(jnp.einsum("bkdq,bkqs->bkds", untransposed(q), ds))
    return dq, dk, dv, jnp.zeros_like(bias)


softmax_attention_f32.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def write_cache(cache, k, v, index, unit=None):
    """Writes k/v [B, T, K, hd] at position `index`; returns (cache, this layer's k, v [B, S, K, hd]).

    cache {"k", "v"}: one layer's [B, K, S, hd], or with `unit` a stacked stage's [n_units, B, K, S, hd] (the layer
    scan's carry), written at [unit, :, :, index] in place: slicing the unit out and stacking it back, as a scanned
    input/output does, copies that layer's whole cache twice per decoded token. Heads-major, because
    `grouped_attention` multiplies K/V as [B, K, S, hd]: the returned [B, S, K, hd] views transpose back for free
    (sequence-major storage cost one transposed copy of the cache per layer per token)."""
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if unit is None:
        cache = {n: jax.lax.dynamic_update_slice_in_dim(cache[n], t.astype(cache[n].dtype), index, axis=2)
                 for n, t in (("k", k), ("v", v))}
        layer = cache
    else:
        zero = jnp.zeros((), jnp.int32)
        cache = {n: jax.lax.dynamic_update_slice(cache[n], t[None].astype(cache[n].dtype),
                                                 (unit, zero, zero, index, zero)) for n, t in (("k", k), ("v", v))}
        layer = {n: jax.lax.dynamic_index_in_dim(cache[n], unit, keepdims=False) for n in ("k", "v")}
    return cache, layer["k"].transpose(0, 2, 1, 3), layer["v"].transpose(0, 2, 1, 3)


def resolve_implementation(config: ModelConfig) -> str:
    if config.attention_impl != "auto":
        return config.attention_impl
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and config.dtype in ("bfloat16", "float16") else "xla"


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, cache_unit=None):
        """x [B, T, D]; mask [B, 1, T, S]; cache {"k", "v"} written at cache_index (see `write_cache`)."""
        cfg = self.config
        hd = cfg.resolved_head_dim

        def proj(heads, names, name):
            return Linear((x.shape[-1], heads, hd), 1, names, weight_init(cfg), cfg.dtype, name=name)

        q = proj(cfg.n_heads, ("embed", "heads", "head_dim"), "q_proj")(x)
        k = proj(cfg.n_kv_heads, ("embed", "kv_heads", "head_dim"), "k_proj")(x)
        v = proj(cfg.n_kv_heads, ("embed", "kv_heads", "head_dim"), "v_proj")(x)
        q = nn.with_logical_constraint(apply_rope(q, cos, sin), ("act_batch", "act_length", "act_heads", "act_head_dim"))
        k = nn.with_logical_constraint(apply_rope(k, cos, sin), ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
        v = nn.with_logical_constraint(v, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))

        if cache is not None:
            cache, k, v = write_cache(cache, k, v, cache_index, cache_unit)

        impl = resolve_implementation(cfg)
        # cuDNN skips the masked-out causal blocks when told the mask is causal; the explicit mask keeps segments
        # and the window exact. Only valid when queries and keys are the same positions (no cache).
        fast_causal = impl == "cudnn" and cache is None
        if impl == "xla":  # measured faster than jax.nn.dot_product_attention's XLA path on CPU (BENCHMARKS.md)
            out = grouped_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, hd ** -0.5, causal=cache is None,
                                    sliding_window=cfg.sliding_window)
        else:
            out = jax.nn.dot_product_attention(
                q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=hd ** -0.5, implementation=impl,
                is_causal=fast_causal,
                local_window_size=(cfg.sliding_window - 1, 0) if fast_causal and cfg.sliding_window else None)
        out = Linear((cfg.n_heads, hd, x.shape[-1]), 2, ("heads", "head_dim", "embed"), residual_out_init(cfg),
                     cfg.dtype, name="o_proj")(out)
        return out, cache
