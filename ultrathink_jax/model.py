"""The decoder: a Llama-family transformer (dense or Mixture-of-Experts) in Flax linen.

Read this file top to bottom for the whole model: `Transformer` embeds the tokens, runs the stages of `Unit`s of
pre-norm `Block`s (attention, then a SwiGLU or MoE MLP, each a residual branch), applies the final norm and the
(tied or untied) head. The blocks' parts stay in `layers/` (norm, rotary, attention, mlp, linear, embedding, init),
one short file each, because they are used on their own too: the MoE layer reuses the MLP, the layer-by-layer
decoder of early exit / speculative decoding (`generate/layerwise.py`) and LoRA use the norm, projections and head.

Layers are stacked with `nn.scan` (parameters get a leading [n_units] axis); on GPU/TPU the scan stays a loop so
compile time does not grow with depth, on CPU it is unrolled (`scan_unroll`), which removes the loop's stacked
residual buffers from the backward pass. A model whose layers are not all alike (MoE every k-th layer, or after n
dense layers) is cut into at most three *stages*, each a scan over identical *units*: `dense_layers` (leading dense
layers), `moe_units` (k-1 dense blocks then one MoE block, repeated) and `dense_tail` (dense layers after the last
MoE layer). `layer_plan` is the single place that says which stage, unit and block holds Hugging Face layer i, so
export/import map layers without guessing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from ultrathink_jax.config import ModelConfig
from ultrathink_jax.layers.attention import Attention, attention_mask, mask_bias, resolve_implementation
from ultrathink_jax.layers.embedding import TokenEmbedding, gathered_table
from ultrathink_jax.layers.init import weight_init
from ultrathink_jax.layers.linear import Linear
from ultrathink_jax.layers.mlp import MLP
from ultrathink_jax.layers.norm import RMSNorm
from ultrathink_jax.layers.rotary import forward_rope_tables
from ultrathink_jax.moe import MoEMLP  # imports the shared layers, never this module

RESIDUAL_AXES = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    first_layer: int
    n_units: int
    unit: tuple[bool, ...]  # per block in a unit: True = MoE block

    def layer_index(self, unit: int, block: int) -> int:
        return self.first_layer + unit * len(self.unit) + block


def layer_plan(config: ModelConfig) -> list[Stage]:
    n = config.n_layers
    moe_layers = [i for i in range(n) if config.is_moe_layer(i)]
    if not moe_layers:
        return [Stage("layers", 0, n, (False,))]
    k = config.moe_every
    start = moe_layers[0] - (k - 1)  # first MoE layer closes the first unit; every later k-th layer is MoE too
    n_units = (n - start) // k
    tail = n - start - n_units * k
    stages = [Stage("dense_layers", 0, start, (False,))] if start else []
    stages.append(Stage("moe_units", start, n_units, (False,) * (k - 1) + (True,)))
    if tail:
        stages.append(Stage("dense_tail", start + n_units * k, tail, (False,)))
    return stages


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)) (dense SwiGLU or MoE)."""

    config: ModelConfig
    moe: bool
    deterministic: bool

    @nn.compact
    def __call__(self, x, cos, sin, mask, valid, cache=None, cache_index=None, cache_unit=None, keep=None):
        """keep: None, or bool [B]: False drops both residual branches for that row (layer dropout)."""
        cfg = self.config
        h, cache = Attention(cfg, name="self_attn")(RMSNorm(cfg.norm_eps, cfg.dtype, name="input_layernorm")(x),
                                                    cos, sin, mask, cache, cache_index, cache_unit)
        # Dropout scales the branches (0 or 1) rather than selecting the block's output: a select keeps both x
        # and y alive for the backward pass (XLA's cost model: +20% bytes per LayerSkip step, +1.5% this way).
        scale = None if keep is None else keep.astype(x.dtype)[:, None, None]
        x = x + (h if scale is None else h * scale)
        h = RMSNorm(cfg.norm_eps, cfg.dtype, name="post_attention_layernorm")(x)
        if self.moe:
            h, aux = MoEMLP(cfg, name="moe")(h, valid, self.deterministic)
        else:
            h, aux = MLP(cfg, cfg.d_ff, name="mlp")(h), {}
        h = h if scale is None else h * scale
        return nn.with_logical_constraint(x + h, RESIDUAL_AXES), cache, aux


class Unit(nn.Module):
    """One scan step: the blocks of one unit in order. The carry holds x and the stage's stacked KV caches (or
    None), which block b of unit `unit` writes in place (`write_cache`)."""

    config: ModelConfig
    kinds: tuple[bool, ...]
    deterministic: bool
    collect_hidden: bool = False  # also return each block's output (early-exit heads read them)

    @nn.compact
    def __call__(self, carry, context, unit, keep):
        """keep: None, or bool [n_blocks, B]: False skips that block for that row (layer dropout)."""
        x, caches = carry
        cos, sin, mask, valid, cache_index = context
        new_caches, aux, hidden = [], {}, []
        for b, moe in enumerate(self.kinds):
            y, cache, block_aux = Block(self.config, moe, self.deterministic, name=f"block_{b}")(
                x, cos, sin, mask, valid, None if caches is None else caches[b], cache_index, unit,
                None if keep is None else keep[b])
            x = y
            new_caches.append(cache)
            hidden.append(x)
            aux = aux or block_aux  # at most one MoE block per unit
        return (x, None if caches is None else new_caches), (aux, jnp.stack(hidden) if self.collect_hidden else None)


def _remat(module, policy: str):
    if policy == "none":
        return module
    jax_policy = {"full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable}[policy]
    return nn.remat(module, policy=jax_policy, prevent_cse=False)


def scan_unroll(config: ModelConfig, n_units: int) -> int:
    """Units per scan-loop iteration (`ModelConfig.scan_unroll`; 0 = auto: unrolled on CPU, rolled elsewhere)."""
    if config.scan_unroll:
        return min(config.scan_unroll, n_units)
    return n_units if jax.default_backend() == "cpu" else 1


class Transformer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, segment_ids, cache=None, deterministic: bool = True,
                 layer_keep=None, exits=None, return_hidden: bool = False):
        """tokens/positions/segment_ids: int32 [B, T] (segment 0 = padding).

        Returns (logits float32 [B, T, V], aux, new_cache). aux["moe"] holds the MoE layers' router statistics
        stacked in layer order (empty for a dense model); new_cache is None unless a cache was given.
        LayerSkip (`train/layerskip.py`): `layer_keep` {stage name: bool [n_units, n_blocks, B]} skips blocks
        per row; `exits` int32 [E] (layer indices) adds aux["exit_logits"] [E, B, T, V], the final norm and head
        applied to those layers' outputs. Both None (the default) leave the computation unchanged.
        return_hidden: return the final-normed activations [B, T, D] in place of the logits, for a loss that
        applies the head itself (`head_kernel`, `losses.head_cross_entropy`).
        """
        cfg = self.config
        embed = TokenEmbedding(cfg, name="embed_tokens")
        x = nn.with_logical_constraint(embed(tokens), RESIDUAL_AXES)
        context, kv_segment_ids = attention_context(cfg, positions, segment_ids, cache)

        stage_caches, moe_aux, hidden = {}, [], []
        for stage in layer_plan(cfg):
            scanned = nn.scan(
                _remat(Unit, cfg.remat_policy),
                variable_axes={"params": 0},
                split_rngs={"params": True, "jitter": True},
                in_axes=(nn.broadcast, 0, 0),  # context; unit index; layer_keep
                length=stage.n_units,
                metadata_params={nn.PARTITION_NAME: "layers"},
                unroll=scan_unroll(cfg, stage.n_units),
            )(cfg, stage.unit, deterministic, exits is not None, name=stage.name)
            (x, stage_cache), (aux, stage_hidden) = scanned(
                (x, None if cache is None else cache["stages"][stage.name]), context, jnp.arange(stage.n_units),
                None if layer_keep is None else layer_keep[stage.name])
            stage_caches[stage.name] = stage_cache
            if aux:
                moe_aux.append(aux)
            if exits is not None:  # [n_units, n_blocks, B, T, D] -> one entry per layer, in layer order
                hidden.append(stage_hidden.reshape(-1, *stage_hidden.shape[2:]))

        final_norm = RMSNorm(cfg.norm_eps, cfg.dtype, name="norm")
        lm_head = None if cfg.tie_embeddings else Linear(
            (cfg.d_model, cfg.vocab_size), 1, ("embed", "vocab"), weight_init(cfg), cfg.dtype, name="lm_head")

        def head(h):
            h = final_norm(h)
            out = embed.attend(h) if lm_head is None else lm_head(h)
            return nn.with_logical_constraint(out.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))

        out = final_norm(x) if return_hidden else head(x)
        aux = {"moe": jax.tree.map(lambda *a: jnp.concatenate(a), *moe_aux)} if moe_aux else {}
        if exits is not None:
            picked = jnp.concatenate(hidden)[exits]
            aux["exit_logits"] = jnp.stack([head(picked[e]) for e in range(picked.shape[0])])
        new_cache = None
        if cache is not None:
            new_cache = {"index": cache["index"] + tokens.shape[1], "segment_ids": kv_segment_ids,
                         "stages": stage_caches}
        return out, aux, new_cache


def head_kernel(params, config: ModelConfig):
    """(the output head's float32 weight, vocab_major): the tied embedding table [V, D] (True) or lm_head's
    kernel [D, V] (False), constrained as `Transformer`'s head multiplies it."""
    if config.tie_embeddings:
        return gathered_table(params["embed_tokens"]["embedding"]), True
    return params["lm_head"]["kernel"], False


def attention_context(cfg: ModelConfig, positions, segment_ids, cache):
    """((cos, sin, mask, valid, cache_index), kv_segment_ids) for a forward pass with or without a KV cache."""
    cos, sin = forward_rope_tables(positions, cfg.resolved_head_dim, cfg.rope_theta, cfg.max_seq_len)
    T = positions.shape[1]
    if cache is None:
        index = jnp.arange(T)
        mask = attention_mask(index, index, segment_ids, segment_ids, cfg.sliding_window)
        cache_index, kv_segment_ids = None, None
    else:
        cache_index = cache["index"]
        kv_segment_ids = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, cache_index, 1)
        mask = attention_mask(cache_index + jnp.arange(T), jnp.arange(kv_segment_ids.shape[1]),
                              segment_ids, kv_segment_ids, cfg.sliding_window)
    if resolve_implementation(cfg) == "xla":
        mask = mask_bias(mask)  # once per forward, not once per layer inside the scan
    return (cos, sin, mask, segment_ids > 0, cache_index), kv_segment_ids


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for `max_len` positions: per stage, per block of a unit, k/v [n_units, B, K, S, hd]
    (heads-major, see `write_cache`)."""
    dtype = dtype or config.dtype
    shape = lambda n: (n, batch, config.n_kv_heads, max_len, config.resolved_head_dim)
    stages = {s.name: [{"k": jnp.zeros(shape(s.n_units), dtype), "v": jnp.zeros(shape(s.n_units), dtype)}
                       for _ in s.unit] for s in layer_plan(config)}
    return {"index": jnp.zeros((), jnp.int32), "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
            "stages": stages}
