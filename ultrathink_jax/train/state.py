"""TrainState (a pytree: params, opt_state, step, rng) and its shardings, derived from logical axis names."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh

from ultrathink_jax import sharding
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.model import Transformer
from ultrathink_jax.params import abstract_params


@struct.dataclass
class TrainState:
    params: Any  # float32, whatever the compute dtype
    opt_state: Any  # float32
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    rng: jax.Array  # uint32[2] raw key (`initial_rng`); step s draws from `step_rng`


def initial_rng(seed) -> jax.Array:
    """A fresh state's `rng` for `seed`: independent of the parameter init key `jax.random.key(seed)`."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 1)


def step_rng(state: TrainState) -> jax.Array:
    """The key of the step `state` is about to take: fold_in(rng, step), so a resumed run draws the same numbers."""
    return jax.random.fold_in(state.rng, state.step)


def strip_boxes(tree):
    """The values inside `nn.Partitioned` boxes. (`nn.unbox` would also apply a sharding constraint, which
    fails on ShapeDtypeStructs while a mesh is active.)"""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _boxed_abstract_state(config: ModelConfig, tx: optax.GradientTransformation) -> TrainState:
    params = abstract_params(config)  # nn.Partitioned boxes: optax states built from them keep the logical names
    return TrainState(params=params, opt_state=jax.eval_shape(tx.init, params),
                      step=jax.ShapeDtypeStruct((), jnp.int32), rng=jax.ShapeDtypeStruct((2,), jnp.uint32))


def state_shardings(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    return sharding.state_shardings(mesh, _boxed_abstract_state(config, tx))


def abstract_state(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for a checkpoint on this mesh."""
    shapes = strip_boxes(_boxed_abstract_state(config, tx))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        state_shardings(config, tx, mesh))


@functools.lru_cache(maxsize=8)
def _jitted_init(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh):
    """One compiled initialiser per (model, optimizer, mesh): every shard is created on its own device."""
    def init(seed):
        ones = jnp.ones((1, 1), jnp.int32)  # shapes only: tokens, positions, segment ids
        params = strip_boxes(Transformer(config).init({"params": jax.random.key(seed)}, ones, ones, ones)["params"])
        return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                          rng=initial_rng(seed))

    return jax.jit(init, out_shardings=state_shardings(config, tx, mesh))


def init_state(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, seed: int) -> TrainState:
    """Fresh state; params equal `params.init_params(config, mesh, seed)`."""
    return _jitted_init(config, tx, mesh)(jnp.asarray(seed, jnp.uint32))
