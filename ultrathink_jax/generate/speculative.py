"""Self-speculative decoding (LayerSkip's draft-and-verify; Leviathan et al. / Chen et al. 2023 for sampling).

Each round: the first `draft_layers` layers l (+ final norm + head) draft `k` tokens one by one, writing their KV
into those layers of the shared cache; they also run once more on the last draft, so layer l's hidden state of
every position [last token, draft_1..draft_k] is known. The full model's verification then only runs the remaining
layers l..L-1 over those k+1 positions in one pass (LayerSkip's cache reuse: the first l layers of the full model
compute exactly what the draft computed). Greedy: the longest prefix of drafts equal to the full model's argmax is
accepted, plus the full model's own next token, so the output is exactly the full model's greedy output.
Sampling: draft i is accepted with probability min(1, p_i / q_i) (p: full, q: draft, both after the same
temperature / top-k / top-p), the first rejected position is resampled from max(p - q, 0) and a fully accepted
round adds a sample from p -- the output distribution is the full model's.

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
from ultrathink_jax.generate.engine import PAD_ID, Engine, Run
from ultrathink_jax.generate.sampling import GenerationError, SamplingConfig, process_logits


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
    """k draft tokens [B, k], their processed logits [B, k, V], layer l's hidden states [B, k+1, D] of the last
    token and the k drafts, and the cache with the draft layers' KV of those k+1 positions written."""
    slots = layerwise.layer_slots(config)[:spec.draft_layers]
    cache, token, position = state["cache"], state["token"], state["position"]
    segment_ids = jnp.where(state["done"], 0, 1)[:, None]
    key = jax.random.fold_in(state["key"], 2 * state["round"])
    drafts, logits_all, hidden = [], [], []
    for j in range(spec.k + 1):
        ctx, cache = layerwise.context(config, (position + j)[:, None], segment_ids, cache)
        x = layerwise.embed(params, config, token[:, None])
        for slot, p in zip(slots, layers):
            x, cache = layerwise.run_layer(config, slot, p, x, ctx, cache)
        cache = {**cache, "index": cache["index"] + 1}
        hidden.append(x)
        if j == spec.k:  # the last draft only needs its layer-l state, for the verification
            break
        logits = process_logits(layerwise.head(params, config, x)[:, -1], None, sampling)
        if sampling.greedy:
            token = jnp.argmax(logits, -1).astype(jnp.int32)
        else:
            token = jax.random.categorical(jax.random.fold_in(key, j), logits, -1).astype(jnp.int32)
        drafts.append(token)
        logits_all.append(logits)
    cache = {**cache, "index": state["cache"]["index"]}
    return jnp.stack(drafts, 1), jnp.stack(logits_all, 1), jnp.concatenate(hidden, 1), cache


def _verify(params, layers, config, spec, x, positions, segment_ids, cache):
    """The full model's logits [B, k+1, V] at the round's positions from layer l's hidden states x [B, k+1, D]:
    layers l..L-1 run over all k+1 positions at once and write their KV."""
    slots = layerwise.layer_slots(config)
    ctx, cache = layerwise.context(config, positions, segment_ids, cache)
    for slot, p in zip(slots[spec.draft_layers:], layers[spec.draft_layers:]):
        x, cache = layerwise.run_layer(config, slot, p, x, ctx, cache)
    return layerwise.head(params, config, x), cache


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
    k = spec.k

    def round_(params, layers, state):
        live = ~state["done"]
        draft, draft_logits, hidden, cache = _draft(params, layers, config, spec, sampling, state)
        positions = state["position"][:, None] + jnp.arange(k + 1)[None]
        segment_ids = jnp.broadcast_to(jnp.where(live, 1, 0)[:, None], positions.shape)
        logits, cache = _verify(params, layers, config, spec, hidden, positions, segment_ids, cache)
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
        state = {**state, "round": zero, "drafted": zero, "accepted": zero, "committed": zero,
                 "cache": layerwise.split_cache(config, state["cache"])}
        state = jax.lax.while_loop(lambda s: ~jnp.all(s["done"]), lambda s: round_(params, layers, s), state)
        return {**state, "cache": layerwise.stack_cache(config, state["cache"])}

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
        self.layers = layerwise.unstack_layers(engine.params, engine.config)  # all: the verification runs them

    def prefill(self, prompts, max_new_tokens, sampling: SamplingConfig = SamplingConfig(), eos_id=None,
                seed=0) -> Run:
        self.spec.check(self.engine.config, sampling)
        return self.engine.prefill(prompts, max_new_tokens, sampling, eos_id, seed, slack=self.spec.k + 1)

    def decode(self, run: Run) -> tuple[Run, SpeculativeStats]:
        """Draft-and-verify rounds on device until every row is done (the run's buffers are donated)."""
        eng, spec = self.engine, self.spec
        decode = _decode_program(eng.config, run.sampling, spec, eng.mesh)
        with sharding.activate(eng.mesh):
            state = decode(eng.params, self.layers, run.state)
        live_rounds = int(state["drafted"]) // spec.k
        stats = SpeculativeStats(int(state["accepted"]) / max(int(state["drafted"]), 1),
                                 # the prefill's token is not a round's
                                 int(state["committed"]) / max(live_rounds, 1), int(state["round"]))
        return Run(state, run.n_rows, run.sampling), stats

    def generate(self, prompts, max_new_tokens, sampling: SamplingConfig = SamplingConfig(), eos_id=None, seed=0):
        run, stats = self.decode(self.prefill(prompts, max_new_tokens, sampling, eos_id, seed))
        return self.engine.tokens(run), stats
