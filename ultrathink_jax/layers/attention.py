"""Grouped-query self-attention with rotary embeddings and an optional functional KV cache."""

import jax
import jax.numpy as jnp
from flax import linen as nn

from ultrathink_jax.config import ModelConfig
from ultrathink_jax.layers.init import residual_out_init, weight_init
from ultrathink_jax.layers.linear import Linear, untransposed
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


def grouped_attention(q, k, v, mask, scale):
    """Softmax attention for the XLA path: q [B, T, H, hd], k/v [B, S, K, hd], mask [B, 1, T, S] boolean or an
    additive float bias. Computed heads-major, as batched matmuls over (B, K): the G = H / K query heads sharing a KV
    head are stacked along the query axis (GQA without repeating K/V), so each matmul is [G*T, hd] x [hd, S] in the
    layout XLA:CPU's batched matmul wants (fewer layout copies than contracting [B, T, K, G, hd] in place). Scores
    and softmax are float32."""
    B, T, H, hd = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    # float32 (the CPU training path) avoids two scores-sized broadcasts that XLA:CPU would materialise, because it
    # fuses elementwise ops into its matmuls only with full-size operands: the scale goes on q ([T, hd] per head)
    # instead of the [T, S] scores, and the softmax is normalised after the PV matmul (as flash attention does), so
    # 1 / sum divides [T, hd]. Other dtypes keep the textbook order: an extra bf16 rounding of q or of the
    # unnormalised probabilities moves bf16 logits measurably (parity_tests/test_jax_bf16.py).
    fast = q.dtype == jnp.float32
    q = (q * scale if fast else q).reshape(B, T, K, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, hd)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, hd]
    bias = mask if jnp.issubdtype(mask.dtype, jnp.floating) else mask_bias(mask)
    if fast:
        out = softmax_attention_f32(q, k, v, bias)
    else:
        scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax((scores * scale).reshape(B, K, G, T, S) + bias[:, :, None], axis=-1)
        out = jnp.einsum("bkqs,bksd->bkqd", probs.reshape(B, K, G * T, S).astype(v.dtype), v)
    return out.reshape(B, K, G, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)


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
    dv = jnp.einsum("bksq,bkqd->bksd", untransposed(p), d_out)
    dp = jnp.einsum("bkqd,bksd->bkqs", d_out, v)
    ds = p * (dp - jnp.sum(d_out * out, -1, keepdims=True))
    dq = jnp.einsum("bkqs,bksd->bkqd", ds, k)
    dk = jnp.einsum("bksq,bkqd->bksd", untransposed(ds), q)
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
            out = grouped_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, hd ** -0.5)
        else:
            out = jax.nn.dot_product_attention(
                q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=hd ** -0.5, implementation=impl,
                is_causal=fast_causal,
                local_window_size=(cfg.sliding_window - 1, 0) if fast_causal and cfg.sliding_window else None)
        out = Linear((cfg.n_heads, hd, x.shape[-1]), 2, ("heads", "head_dim", "embed"), residual_out_init(cfg),
                     cfg.dtype, name="o_proj")(out)
        return out, cache
