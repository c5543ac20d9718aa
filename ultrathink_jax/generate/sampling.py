"""Next-token choice: pure jnp functions on float32 logits [B, V], in transformers' order.

`process_logits` applies the CTRL repetition penalty, then temperature, top-k and top-p exactly as transformers'
RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper do; filtered
entries become -inf. Greedy (temperature 0) is the argmax of the penalised logits, lowest id on ties like
`torch.argmax`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


class GenerationError(ValueError):
    """A generation argument that cannot work; the message names the argument and the value."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Hashable, so compiled generation functions are cached per setting. Defaults switch every filter off."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off

    def __post_init__(self):
        if not self.temperature >= 0:
            raise GenerationError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise GenerationError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not self.repetition_penalty > 0:
            raise GenerationError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def repetition_penalty(logits, seen, penalty: float):
    """CTRL penalty: a seen token's logit is divided by `penalty` if positive, multiplied if negative."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def top_k_filter(logits, k: int):
    """Keeps the k largest logits per row (and any tied with the k-th), like TopKLogitsWarper."""
    kth = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits, p: float):
    """Nucleus filter: drops a token once the probability mass ranked above it reaches p; the top token stays.

    Same rule as TopPLogitsWarper: sort ascending, drop where the cumulative probability is <= 1 - p.
    """
    order = jnp.argsort(logits, axis=-1, stable=True)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted = drop_sorted.at[..., -1].set(False)  # min_tokens_to_keep = 1
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, logits)


def process_logits(logits, seen, sampling: SamplingConfig):
    """Penalty, then (when sampling) temperature, top-k, top-p. `seen` [B, V] bool marks tokens to penalise."""
    logits = logits.astype(jnp.float32)
    if sampling.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.greedy:
        return logits
    logits = logits / sampling.temperature
    if sampling.top_k:
        logits = top_k_filter(logits, sampling.top_k)
    if sampling.top_p < 1.0:
        logits = top_p_filter(logits, sampling.top_p)
    return logits


def next_token(logits, seen, key, sampling: SamplingConfig):
    """int32 [B]: argmax when greedy, else one draw per row from softmax of the processed logits."""
    logits = process_logits(logits, seen, sampling)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
