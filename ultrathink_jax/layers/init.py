"""Initialisers, as the original ULTRATHINK: truncated normal (std 0.02, cut at +-2 sigma) for weights, N(0, 0.02)
for embeddings, and the output projection of every residual branch scaled by 1/sqrt(2 * n_layers) (GPT-2) so the
residual stream's variance does not grow with depth."""

import math

import jax

from ultrathink_jax.config import ModelConfig


def weight_init(config: ModelConfig):
    return jax.nn.initializers.truncated_normal(config.init_std, lower=-2.0, upper=2.0)


def residual_out_init(config: ModelConfig):
    return jax.nn.initializers.truncated_normal(
        config.init_std / math.sqrt(2 * config.n_layers), lower=-2.0, upper=2.0)


def embedding_init(config: ModelConfig):
    return jax.nn.initializers.normal(config.init_std)
