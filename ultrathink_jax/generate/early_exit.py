"""FAST path: per-token early exit at decode time (CALM, Schuster et al. 2022).

After each candidate layer l (`layers`; default every layer before the last) a row whose confidence passes
`threshold` stops there. Confidence measures:
  max_prob    the softmax's top probability of the exit state through the final norm and head;
  margin      the gap between the top two of that softmax;
  saturation  CALM's hidden-state saturation: the cosine similarity of layer l's output and input (the state
              stopped changing). O(d_model) per check, where the two softmax measures pay a d_model x vocab head
              matmul at every candidate layer; the head then runs once, on the exit state.
The later layers' KV entries of an exited token are filled from its exit state (CALM's state copying: each later
layer's k/v projections of the copied hidden state), so later tokens attend to a complete cache. Once every row of
the batch has exited the remaining layers are skipped with `lax.cond` (the FLOPs really are saved); a row that
exits while others continue keeps its exit state (later blocks run on it only to fill their cache), so in a batch
the FLOPs counted as saved per token are only really saved at batch 1 or when the rows exit together.

`threshold` is calibrated on held-out text by `calibrate`: teacher-forced decoding through the same step, so the
perplexity it measures includes the effect of copied KV states.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ultrathink_jax import metrics, sharding
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.generate import layerwise
from ultrathink_jax.generate.engine import Engine, Run, choose_token
from ultrathink_jax.generate.sampling import GenerationError, SamplingConfig
from ultrathink_jax.model import Transformer, init_cache

MEASURES = ("max_prob", "margin", "saturation")
HEAD_MEASURES = ("max_prob", "margin")  # read the softmax of the exit state's logits


@dataclasses.dataclass(frozen=True)
class EarlyExitConfig:
    threshold: float  # exit when confidence >= threshold; in (0, 1]
    measure: str = "max_prob"
    layers: tuple[int, ...] = ()  # candidate exit layers (0-based, increasing, before the last); () = all of them

    def check(self, config: ModelConfig) -> None:
        if not 0 < self.threshold <= 1:
            raise GenerationError(f"early_exit_threshold={self.threshold} must be in (0, 1]")
        if self.measure not in MEASURES:
            raise GenerationError(f"early_exit_measure={self.measure!r} must be one of {MEASURES}")
        layers = list(self.layers)
        in_range = all(isinstance(l, (int, np.integer)) and 0 <= l < config.n_layers - 1 for l in layers)
        if not in_range or layers != sorted(set(layers)):
            raise GenerationError(f"early_exit_layers={','.join(map(str, layers))} must be increasing layer indices "
                                  f"in [0, n_layers - 1 = {config.n_layers - 1})")

    def candidates(self, config: ModelConfig) -> tuple[int, ...]:
        return self.layers or tuple(range(config.n_layers - 1))


def parse_layers(text: str) -> tuple[int, ...]:
    """"2,5,8" -> (2, 5, 8) (the range is checked by EarlyExitConfig.check, which knows the model)."""
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise GenerationError(f"early_exit_layers={text!r} must be comma-separated layer indices") from None


def confidence(logits, measure: str):
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if measure == "max_prob":
        return probs.max(-1)
    top2 = jax.lax.top_k(probs, 2)[0]
    return top2[..., 0] - top2[..., 1]


def saturation(before, after):
    """Cosine similarity of a layer's input and output [B, 1, D] -> [B] (CALM's hidden-state saturation)."""
    a, b = before[:, -1].astype(jnp.float32), after[:, -1].astype(jnp.float32)
    return jnp.sum(a * b, -1) * jax.lax.rsqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1) + 1e-12)


def forward(params, layers, config: ModelConfig, ee: EarlyExitConfig, threshold, tokens, positions, segment_ids,
            cache, exited):
    """One decode position for every row: (logits [B, V], depth int32 [B] = layers run in full, cache).

    `threshold` is traced (one compiled program serves every threshold; `ee.threshold` is not read); `cache` is
    split per layer (layerwise.split_cache); `exited` bool [B]: rows that take no part (finished rows), counted as
    depth 0."""
    slots = layerwise.layer_slots(config)
    L = len(slots)
    candidates = set(ee.candidates(config))
    by_head = ee.measure in HEAD_MEASURES
    ctx, cache = layerwise.context(config, positions, segment_ids, cache)
    x = layerwise.embed(params, config, tokens)
    depth = jnp.zeros(tokens.shape[0], jnp.int32)
    exit_logits = jnp.zeros((tokens.shape[0], config.vocab_size), jnp.float32)

    def fill_rest(i, x, cache):
        for j in range(i, L):
            cache = layerwise.fill_kv(config, slots[j], layers[j], x, ctx, cache)
        return cache

    def final_logits(x, exited, exit_logits):
        """Head measures kept the exit logits they computed; otherwise x holds each row's exit state."""
        logits = layerwise.head(params, config, x)[:, -1]
        return jnp.where(exited[:, None], exit_logits, logits) if by_head else logits

    def from_layer(i, x, cache, exited, exit_logits, depth):
        y, cache = layerwise.run_layer(config, slots[i], layers[i], x, ctx, cache)
        depth = depth + ~exited
        before, x = x, jnp.where(exited[:, None, None], x, y)
        if i == L - 1:
            return final_logits(x, exited, exit_logits), depth, cache
        if i in candidates:
            if by_head:
                logits = layerwise.head(params, config, x)[:, -1]
                now = ~exited & (confidence(logits, ee.measure) >= threshold)
                exit_logits = jnp.where(now[:, None], logits, exit_logits)
                done = lambda: exit_logits  # noqa: E731
            else:
                now = ~exited & (saturation(before, x) >= threshold)
                done = lambda: layerwise.head(params, config, x)[:, -1]  # noqa: E731
            exited = exited | now
            return jax.lax.cond(jnp.all(exited),
                                lambda: (done(), depth, fill_rest(i + 1, x, cache)),
                                lambda: from_layer(i + 1, x, cache, exited, exit_logits, depth))
        return from_layer(i + 1, x, cache, exited, exit_logits, depth)

    logits, depth, cache = from_layer(0, x, cache, exited, exit_logits, depth)
    return logits, depth, {**cache, "index": cache["index"] + tokens.shape[1]}


def _program_key(ee: EarlyExitConfig) -> EarlyExitConfig:
    """What a compiled program depends on: everything but the threshold, which it takes as an argument."""
    return dataclasses.replace(ee, threshold=1.0)


@functools.lru_cache(maxsize=None)
def _decode_program(config: ModelConfig, sampling: SamplingConfig, ee: EarlyExitConfig, mesh):
    def step(params, layers, threshold, state):
        segment_ids = jnp.where(state["done"], 0, 1)[:, None]
        live = ~state["done"]
        logits, depth, cache = forward(params, layers, config, ee, threshold, state["token"][:, None],
                                       state["position"][:, None], segment_ids, state["cache"], state["done"])
        counts = jnp.sum(jax.nn.one_hot(depth, config.n_layers + 1, dtype=jnp.int32) * live[:, None], 0)
        state = {**state, "cache": cache, "position": state["position"] + 1,
                 "depth_counts": state["depth_counts"] + counts}
        return choose_token(state, logits, state["step"], sampling)

    def decode(params, layers, threshold, state):
        n_new = state["out"].shape[1]
        state = {**state, "depth_counts": jnp.zeros((config.n_layers + 1,), jnp.int32),  # tokens per depth
                 "cache": layerwise.split_cache(config, state["cache"])}
        state = jax.lax.while_loop(lambda s: (s["step"] < n_new) & ~jnp.all(s["done"]),
                                   lambda s: step(params, layers, threshold, s), state)
        return {**state, "cache": layerwise.stack_cache(config, state["cache"])}

    return jax.jit(decode, donate_argnums=3)


class _NetSaving:
    """For results with `layer_flops_saved` and `check_cost` fields: the saving net of the checks' cost."""

    @property
    def net_flops_saved(self) -> float:
        return self.layer_flops_saved - self.check_cost


@dataclasses.dataclass
class EarlyExitStats(_NetSaving):
    mean_depth: float  # layers run in full per decoded token (the prefill and the first token run all layers)
    n_layers: int
    layer_flops_saved: float  # fraction of the decoded tokens' layer matmul FLOPs not spent (KV filling counted)
    check_cost: float  # the confidence checks' FLOPs, as a fraction of the full model's layer matmul FLOPs


def check_flops(config: ModelConfig, measure: str) -> int:
    """Multiply-adds of one confidence check per token: a head measure's extra final-norm input to logits matmul
    (d_model x vocab; its norm and softmax are not counted, as the layers' norms and attention scores are not);
    saturation's three d_model dot products (x.y, x.x, y.y)."""
    return config.d_model * config.vocab_size if measure in HEAD_MEASURES else 3 * config.d_model


def flops_saved(config: ModelConfig, depths: np.ndarray, ee: EarlyExitConfig) -> tuple[float, float]:
    """(layer FLOPs saved, confidence-check cost) for tokens that ran `depths` layers in full, both fractions of
    the full model's layer matmul multiply-adds per token (metrics.matmul_params_per_token less the head): a
    skipped layer still pays its k/v projections; a token pays one check at every candidate layer it ran. The
    net saving is the difference. The exit's own logits are not extra: the full model computes one head too."""
    d, hd = config.d_model, config.resolved_head_dim
    head = d * config.vocab_size
    layer = (metrics.matmul_params_per_token(config) - head) / config.n_layers  # mean per layer
    kv = 2 * d * config.n_kv_heads * hd
    depths = np.asarray(depths, np.float64)
    spent = depths * layer + (config.n_layers - depths) * kv
    checks = np.searchsorted(np.asarray(ee.candidates(config)), depths, side="left")  # candidates below depth
    full = config.n_layers * layer
    return float(1 - spent.mean() / full), float(checks.mean() * check_flops(config, ee.measure) / full)


class EarlyExitEngine:
    """Plain prefill (all layers), then early-exit decoding; `generate` also returns EarlyExitStats."""

    def __init__(self, engine: Engine, ee: EarlyExitConfig):
        ee.check(engine.config)
        self.engine, self.ee = engine, ee
        self.layers = layerwise.unstack_layers(engine.params, engine.config)

    def decode(self, run: Run) -> tuple[Run, EarlyExitStats]:
        """Early-exit decoding on device until every row is done (the run's buffers are donated)."""
        eng = self.engine
        decode = _decode_program(eng.config, run.sampling, _program_key(self.ee), eng.mesh)
        with sharding.activate(eng.mesh):
            state = decode(eng.params, self.layers, jnp.float32(self.ee.threshold), run.state)
        counts = np.asarray(state["depth_counts"])
        depths = np.repeat(np.arange(counts.size), counts) if counts.sum() else np.asarray([eng.config.n_layers])
        saved, cost = flops_saved(eng.config, depths, self.ee)
        return (Run(state, run.n_rows, run.sampling),
                EarlyExitStats(float(depths.mean()), eng.config.n_layers, saved, cost))

    def generate(self, prompts, max_new_tokens, sampling: SamplingConfig = SamplingConfig(), eos_id=None, seed=0):
        run, stats = self.decode(self.engine.prefill(prompts, max_new_tokens, sampling, eos_id, seed))
        return self.engine.tokens(run), stats


@functools.lru_cache(maxsize=None)
def _forced_program(config: ModelConfig, ee: EarlyExitConfig):
    """Teacher-forced early exit over tokens [B, T]: per position (nll of the next token, depth, exit argmax)."""
    def run(params, layers, threshold, tokens):
        B, T = tokens.shape
        cache = layerwise.split_cache(config, init_cache(config, B, T))
        ones = jnp.ones((B, 1), jnp.int32)

        def step(cache, t):
            logits, depth, cache = forward(params, layers, config, ee, threshold,
                                           jax.lax.dynamic_slice_in_dim(tokens, t, 1, 1), ones * t, ones, cache,
                                           jnp.zeros((B,), bool))
            return cache, (logits, depth)

        _, (logits, depth) = jax.lax.scan(step, cache, jnp.arange(T - 1))
        logits = logits.swapaxes(0, 1)  # [B, T-1, V]
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
        return nll, depth.T, jnp.argmax(logits, -1)

    return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _full_program(config: ModelConfig):
    def run(params, tokens):
        B, T = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(T), (B, T))
        logits, _, _ = Transformer(config).apply({"params": params}, tokens, pos, jnp.ones_like(tokens))
        logits = logits[:, :-1]
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
        return nll, jnp.argmax(logits, -1)

    return jax.jit(run)


@dataclasses.dataclass
class HeldOutResult(_NetSaving):
    threshold: float
    perplexity: float
    full_perplexity: float
    mean_depth: float
    layer_flops_saved: float
    check_cost: float
    greedy_agreement: float  # fraction of positions whose exit argmax equals the full model's

    @property
    def perplexity_increase(self) -> float:
        return self.perplexity / self.full_perplexity - 1


def evaluate(params, config: ModelConfig, tokens: np.ndarray, ee: EarlyExitConfig, layers=None) -> HeldOutResult:
    """Held-out rows `tokens` [B, T] (every token from one document): early-exit vs full-model perplexity."""
    ee.check(config)
    layers = layerwise.unstack_layers(params, config) if layers is None else layers
    tokens = jnp.asarray(tokens, jnp.int32)
    forced = _forced_program(config, _program_key(ee))
    nll, depth, argmax = jax.device_get(forced(params, layers, jnp.float32(ee.threshold), tokens))
    full_nll, full_argmax = jax.device_get(_full_program(config)(params, tokens))
    saved, cost = flops_saved(config, depth.reshape(-1), ee)
    return HeldOutResult(ee.threshold, math.exp(float(nll.mean())), math.exp(float(full_nll.mean())),
                         float(depth.mean()), saved, cost, float((argmax == full_argmax).mean()))


def calibrate(params, config: ModelConfig, tokens: np.ndarray, max_perplexity_increase: float = 0.02,
              measure: str = "max_prob", layers: tuple[int, ...] = (),
              thresholds=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)) -> tuple[float | None, list[HeldOutResult]]:
    """The lowest threshold (most exits) whose held-out perplexity rises by at most `max_perplexity_increase`,
    or None if none does; plus every threshold's result."""
    per_layer = layerwise.unstack_layers(params, config)
    results = [evaluate(params, config, tokens, EarlyExitConfig(t, measure, layers), per_layer)
               for t in sorted(thresholds)]
    ok = [r.threshold for r in results if r.perplexity_increase <= max_perplexity_increase]
    return (min(ok) if ok else None), results
