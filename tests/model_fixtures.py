"""Tiny models and inputs shared by the model tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ultrathink_jax import sharding
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.model import Transformer
from ultrathink_jax.params import init_params

TINY = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def single_device_mesh():
    return sharding.make_mesh({}, jax.devices()[:1])


def init(config: ModelConfig, seed: int = 0, mesh=None):
    return init_params(config, mesh or single_device_mesh(), seed)


def row_inputs(tokens, segment_ids=None):
    """Batch-of-one-or-more inputs with positions restarting at each segment."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if segment_ids is None:
        segment_ids = np.ones(tokens.shape, np.int32)
    segment_ids = np.asarray(segment_ids, np.int32)
    positions = np.zeros_like(segment_ids)
    for b in range(segment_ids.shape[0]):
        for t in range(1, segment_ids.shape[1]):
            positions[b, t] = positions[b, t - 1] + 1 if segment_ids[b, t] == segment_ids[b, t - 1] else 0
    return tokens, jnp.asarray(positions), jnp.asarray(segment_ids)


@functools.lru_cache(maxsize=None)
def jitted_apply(config: ModelConfig):
    """Jitted forward (tokens, positions, segment_ids, cache=None) -> (logits, aux, cache); one compile per config."""
    return jax.jit(lambda params, *args: Transformer(config).apply({"params": params}, *args))


def logits_of(config, params, tokens, segment_ids=None):
    return jitted_apply(config)(params, *row_inputs(tokens, segment_ids))[0]


def random_tokens(config, shape, seed=1):
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape, dtype=np.int32)
