"""Parameters from abstract shapes: counting without allocating, and sharded init under jit.

Init runs under `jax.jit` with `out_shardings` derived from the logical axis names, so every device creates only
its own shard and the full model never materialises in one place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from ultrathink_jax import sharding
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.model import Transformer


def _dummy_inputs(batch: int = 1, length: int = 1):
    zeros = jnp.zeros((batch, length), jnp.int32)
    return zeros, zeros, jnp.ones((batch, length), jnp.int32)


def _init_boxed(config: ModelConfig, rng):
    return Transformer(config).init({"params": rng}, *_dummy_inputs())["params"]


def abstract_params(config: ModelConfig):
    """ShapeDtypeStructs wrapped in `nn.Partitioned` boxes that carry logical axis names. Allocates nothing."""
    return jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0)))


def param_count(config: ModelConfig) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract_params(config))))


def param_shardings(config: ModelConfig, mesh: Mesh):
    return sharding.state_shardings(mesh, abstract_params(config))


def init_params(config: ModelConfig, mesh: Mesh, seed: int = 0):
    """Plain (unboxed) float32 params, each leaf sharded on `mesh` as the logical-axis rules say."""
    init = jax.jit(lambda key: nn.unbox(_init_boxed(config, key)), out_shardings=param_shardings(config, mesh))
    return init(jax.random.key(seed))
