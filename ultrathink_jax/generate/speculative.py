"""Self-speculative decoding (LayerSkip's draft-and-verify; Leviathan et al. / Chen et al. 2023 for sampling).

Each round: the first `draft_layers` layers (+ final norm + head) draft `k` tokens one by one, writing their KV
into those layers of the shared cache; the full model then verifies [last token, draft_1..draft_k] in one forward
pass over the k+1 positions (rewriting every layer's KV there). Greedy: the longest prefix of drafts equal to the
full model's argmax is accepted, plus the full model's own next token, so the output is exactly the full model's
greedy output. Sampling: draft i is accepted with probability min(1, p_i / q_i) (p: full, q: draft, both after
the same temperature / top-k / top-p), the first rejected position is resampled from max(p - q, 0) and a fully
accepted round adds a sample from p -- the output distribution is the full model's.

Rows of a batch advance together: a round commits the shortest accepted prefix over live rows plus one token,
which is still every row's full-model token (a longer-accepting row's next draft was accepted). The committed
positions' KV stays in the cache; the rest is overwritten next round (causal masking never reads it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ultrathink_jax import sharding
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.generate import layerwise
from ultrathink_jax.generate.engine import PAD_ID, Engine
from ultrathink_jax.generate.sampling import GenerationError, SamplingConfig, process_logits
from ultrathink_jax.model import Transformer


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    draft_layers: int
    k: int

    def check(self, config: ModelConfig, sampling: SamplingConfig) -> None:
        if not 0 < self.draft_layers < config.n_layers:
            raise GenerationError(f"speculative_draft_layers={self.draft_layers} must be in [1, n_layers - 1 = "
                                  f"{config.n_layers - 1}]")
        if self.k < 1:
            raise GenerationError(f"speculative_k={self.k} must be >= 1")
        if sampling.repetition_penalty != 1.0:
            raise GenerationError(f"repetition_penalty={sampling.repetition_penalty} cannot be combined with "
                                  "speculative decoding (the penalty changes within a round); use 1")


def _draft(params, layers, config, spec, sampling, state):
    """k draft tokens [B, k] and their processed logits [B, k, V] (cache: draft layers written)."""
    slots = layerwise.layer_slots(config)[:spec.draft_layers]
    cache, token, position = state["cache"], state["token"], state["position"]
    segment_ids = jnp.where(state["done"], 0, 1)[:, None]
    key = jax.random.fold_in(state["key"], 2 * state["round"])
    drafts, logits_all = [], []
    for j in range(spec.k):
        ctx, cache = layerwise.context(config, (position + j)[:, None], segment_ids, cache)
        x = layerwise.embed(params, config, token[:, None])
        for slot, p in zip(slots, layers):
            x, cache = layerwise.run_layer(config, slot, p, x, ctx, cache)
        logits = process_logits(layerwise.head(params, config, x)[:, -1], None, sampling)
        cache = {**cache, "index": cache["index"] + 1}
        if sampling.greedy:
            token = jnp.argmax(logits, -1).astype(jnp.int32)
        else:
            token = jax.random.categorical(jax.random.fold_in(key, j), logits, -1).astype(jnp.int32)
        drafts.append(token)
        logits_all.append(logits)
    cache = {**cache, "index": state["cache"]["index"]}
    return jnp.stack(drafts, 1), jnp.stack(logits_all, 1), cache


def _accept(full_logits, draft, draft_logits, sampling, key):
    """(n_r int32 [B]: accepted drafts per row, candidates [B, k+1]: the token each row would emit at each
    position if its round ended there -- the full model's choice there)."""
    B, k = draft.shape
    if sampling.greedy:
        best = jnp.argmax(full_logits, -1).astype(jnp.int32)  # [B, k+1]
        return jnp.sum(jnp.cumprod(draft == best[:, :k], axis=1), axis=1), best
    p = jax.nn.softmax(full_logits, -1)
    q = jax.nn.softmax(draft_logits, -1)
    p_d = jnp.take_along_axis(p[:, :k], draft[..., None], -1)[..., 0]
    q_d = jnp.take_along_axis(q, draft[..., None], -1)[..., 0]
    u_key, r_key = jax.random.split(key)
    accepted = jax.random.uniform(u_key, (B, k)) * q_d < p_d  # u < p/q, without dividing by a zero q
    n_r = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1)
    residual = jnp.maximum(p[:, :k] - q, 0)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p[:, :k])  # p == q: any rejection is moot
    correction = jnp.concatenate([residual, p[:, k:]], 1)  # position k: the bonus sample from p
    resampled = jax.random.categorical(r_key, jnp.log(correction), -1).astype(jnp.int32)
    # at position j a row emits its draft if it accepted past j, else the resampled token
    draft_ext = jnp.concatenate([draft, jnp.zeros((B, 1), jnp.int32)], 1)
    candidates = jnp.where(jnp.arange(k + 1)[None] < n_r[:, None], draft_ext, resampled)
    return n_r, candidates


@functools.lru_cache(maxsize=None)
def _decode_program(config: ModelConfig, sampling: SamplingConfig, spec: SpeculativeConfig, mesh):
    model = Transformer(config)
    k = spec.k

    def round_(params, layers, state):
        live = ~state["done"]
        draft, draft_logits, cache = _draft(params, layers, config, spec, sampling, state)
        tokens = jnp.concatenate([state["token"][:, None], draft], 1)
        positions = state["position"][:, None] + jnp.arange(k + 1)[None]
        segment_ids = jnp.broadcast_to(jnp.where(live, 1, 0)[:, None], tokens.shape)
        logits, _, cache = model.apply({"params": params}, tokens, positions, segment_ids, cache)
        full = process_logits(logits.reshape(-1, logits.shape[-1]), None, sampling).reshape(logits.shape)
        n_r, candidates = _accept(full, draft, draft_logits, sampling,
                                  jax.random.fold_in(state["key"], 2 * state["round"] + 1))
        n = jnp.min(jnp.where(live, n_r, k))  # common accepted prefix
        emitted = candidates  # positions 0..n are committed
        j = jnp.arange(k + 1)[None]
        is_eos = (emitted == state["eos"]) & (j <= n)
        first_eos = jnp.min(jnp.where(is_eos, j, k + 1), axis=1)
        count = jnp.minimum(jnp.minimum(n + 1, first_eos + 1), state["budget"] - state["length"])
        count = jnp.where(live, count, 0)
        written = jnp.where(j < count[:, None], emitted, PAD_ID)
        out = jax.lax.dynamic_update_slice_in_dim(state["out"], written, state["step"], axis=1)
        length = state["length"] + count
        done = state["done"] | (live & ((first_eos < count) | (length >= state["budget"])))
        last = jnp.take_along_axis(emitted, jnp.broadcast_to(n, (emitted.shape[0], 1)), 1)[:, 0]
        return {**state, "cache": {**cache, "index": state["cache"]["index"] + n + 1}, "out": out,
                "length": length, "done": done, "token": jnp.where(live, last, PAD_ID),
                "position": state["position"] + n + 1, "step": state["step"] + n + 1, "round": state["round"] + 1,
                "drafted": state["drafted"] + k * jnp.sum(live), "accepted": state["accepted"] + jnp.sum(
                    jnp.where(live, n_r, 0)), "committed": state["committed"] + jnp.sum(count)}

    def decode(params, layers, state):
        zero = jnp.zeros((), jnp.int32)
        state = {**state, "round": zero, "drafted": zero, "accepted": zero, "committed": zero}
        return jax.lax.while_loop(lambda s: ~jnp.all(s["done"]), lambda s: round_(params, layers, s), state)

    return jax.jit(decode, donate_argnums=2)


@dataclasses.dataclass
class SpeculativeStats:
    acceptance_rate: float  # accepted drafts / drafted tokens (per row, before the batch's common prefix)
    tokens_per_round: float  # committed tokens per live row per round (1 = no gain over plain decoding)
    rounds: int


class SpeculativeEngine:
    """Plain prefill, then draft-and-verify rounds; `generate` also returns SpeculativeStats."""

    def __init__(self, engine: Engine, spec: SpeculativeConfig):
        self.engine, self.spec = engine, spec
        self.layers = layerwise.unstack_layers(engine.params, engine.config, spec.draft_layers)

    def generate(self, prompts, max_new_tokens, sampling: SamplingConfig = SamplingConfig(), eos_id=None, seed=0):
        eng, spec = self.engine, self.spec
        spec.check(eng.config, sampling)
        run = eng.prefill(prompts, max_new_tokens, sampling, eos_id, seed, slack=spec.k + 1)
        decode = _decode_program(eng.config, sampling, spec, eng.mesh)
        with sharding.activate(eng.mesh):
            state = decode(eng.params, self.layers, run.state)
        run.state = state
        rounds = int(state["round"])
        live_rounds = int(state["drafted"]) // spec.k
        stats = SpeculativeStats(int(state["accepted"]) / max(int(state["drafted"]), 1),
                                 # the prefill's token is not a round's
                                 (int(state["committed"])) / max(live_rounds, 1), rounds)
        return eng.tokens(run), stats
