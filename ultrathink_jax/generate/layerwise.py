"""The decoder run one layer at a time over the functional KV cache, for decoders that stop early.

`Transformer` scans its stacked layers in one `nn.scan`; early exit and self-speculative drafting need to stop
after layer l, so here the same `Block` modules run from per-layer params (`unstack_layers`, sliced once off the
stacked tree, never a second copy of the weights on disk) and read/write the very cache `Transformer` uses. The
embedding, attention context and head are the model's own modules and functions. Inside a decode loop the cache
is held per layer (`split_cache`): a layer then writes its new k/v into its own buffer in place, where writing
into `Transformer`'s stacked [n_units, ...] arrays would copy a layer's whole cache in and out at every layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ultrathink_jax.config import ModelConfig
from ultrathink_jax.layers.attention import write_cache
from ultrathink_jax.layers.embedding import TokenEmbedding
from ultrathink_jax.layers.init import weight_init
from ultrathink_jax.layers.linear import Linear
from ultrathink_jax.layers.norm import RMSNorm
from ultrathink_jax.layers.rotary import apply_rope
from ultrathink_jax.model import Block, attention_context, layer_plan


@dataclasses.dataclass(frozen=True)
class LayerSlot:
    layer: int
    stage: str
    unit: int
    block: int
    moe: bool


def layer_slots(config: ModelConfig) -> list[LayerSlot]:
    """Where layer i's params and cache live: `params[stage][f"block_{block}"][..][unit]`, in layer order."""
    return [LayerSlot(s.layer_index(u, b), s.name, u, b, moe) for s in layer_plan(config) for u in range(s.n_units)
            for b, moe in enumerate(s.unit)]


def unstack_layers(params, config: ModelConfig, n_layers: int | None = None) -> list:
    """Per-layer param trees of the first `n_layers` layers (default: all)."""
    slots = layer_slots(config)[:n_layers]
    return [jax.tree.map(lambda a, u=s.unit: a[u], params[s.stage][f"block_{s.block}"]) for s in slots]


def stack_layers(params, config: ModelConfig, layers: list):
    """The inverse of `unstack_layers` (all layers): `params` with each stage's blocks stacked again from `layers`."""
    stages = {s.name: {f"block_{b}": jax.tree.map(lambda *units: jnp.stack(units),
                                                   *[layers[s.layer_index(u, b)] for u in range(s.n_units)])
                       for b in range(len(s.unit))} for s in layer_plan(config)}
    return {**params, **stages}


def embed(params, config: ModelConfig, tokens):
    return TokenEmbedding(config).apply({"params": params["embed_tokens"]}, tokens)


def head(params, config: ModelConfig, x):
    """Final norm + LM head (tied or not) -> float32 logits, exactly as the model's own output."""
    x = RMSNorm(config.norm_eps, config.dtype).apply({"params": params["norm"]}, x)
    if config.tie_embeddings:
        out = TokenEmbedding(config).apply({"params": params["embed_tokens"]}, x, method="attend")
    else:
        out = Linear((config.d_model, config.vocab_size), 1, ("embed", "vocab"), weight_init(config),
                     config.dtype).apply({"params": params["lm_head"]}, x)
    return out.astype(jnp.float32)


def context(config: ModelConfig, positions, segment_ids, cache):
    """(block context, cache with the new tokens' segment ids written)."""
    ctx, kv_segment_ids = attention_context(config, positions, segment_ids, cache)
    return ctx, {**cache, "segment_ids": kv_segment_ids}


def split_cache(config: ModelConfig, cache):
    """`Transformer`'s cache with its stacked k/v arrays cut into one {"k", "v"} per layer (`cache["layers"]`)."""
    layers = [{n: cache["stages"][s.stage][s.block][n][s.unit] for n in ("k", "v")} for s in layer_slots(config)]
    return {"index": cache["index"], "segment_ids": cache["segment_ids"], "layers": layers}


def stack_cache(config: ModelConfig, cache):
    """The inverse of `split_cache`."""
    per_layer = cache["layers"]
    stages = {s.name: [{n: jnp.stack([per_layer[s.layer_index(u, b)][n] for u in range(s.n_units)])
                        for n in ("k", "v")} for b in range(len(s.unit))] for s in layer_plan(config)}
    return {"index": cache["index"], "segment_ids": cache["segment_ids"], "stages": stages}


def _set_layer_cache(cache, slot: LayerSlot, new):
    layers = list(cache["layers"])
    layers[slot.layer] = new
    return {**cache, "layers": layers}


def run_layer(config: ModelConfig, slot: LayerSlot, layer_params, x, ctx, cache):
    """One block over x [B, T, D] at the (split) cache's index; returns (x, cache with this layer's k/v written)."""
    cos, sin, mask, valid, cache_index = ctx
    y, new, _ = Block(config, slot.moe, True).apply({"params": layer_params}, x, cos, sin, mask, valid,
                                                     cache["layers"][slot.layer], cache_index)
    return y, _set_layer_cache(cache, slot, new)


def fill_kv(config: ModelConfig, slot: LayerSlot, layer_params, x, ctx, cache):
    """Writes the k/v this layer would store for input x without running it (CALM's copied exit state): the
    input norm, k/v projections and RoPE of `Attention`, nothing else."""
    cos, sin, _, _, cache_index = ctx
    hd = config.resolved_head_dim
    h = RMSNorm(config.norm_eps, config.dtype).apply({"params": layer_params["input_layernorm"]}, x)
    attn = layer_params["self_attn"]

    def proj(name):
        return Linear((x.shape[-1], config.n_kv_heads, hd), 1, ("embed", "kv_heads", "head_dim"), weight_init(config),
                      config.dtype).apply({"params": attn[name]}, h)

    k, v = apply_rope(proj("k_proj"), cos, sin), proj("v_proj")
    new, _, _ = write_cache(cache["layers"][slot.layer], k, v, cache_index)
    return _set_layer_cache(cache, slot, new)
