"""Rotary position embedding, Hugging Face's rotate-half layout: dimension i is paired with i + head_dim/2."""

import jax
import jax.numpy as jnp


def rope_tables(positions, head_dim: int, theta: float):
    """cos/sin of shape [B, T, head_dim], computed in float32 from integer positions [B, T]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def forward_rope_tables(positions, head_dim: int, theta: float, max_len: int):
    """`rope_tables` for one forward pass. On CPU they are made once, as the outputs of a `lax.cond` (buffers XLA
    does not fuse into their consumers): rows of a [max_len, head_dim] table picked by position when every position
    is in [0, max_len), else computed directly. Left to fusion, XLA:CPU recomputes cos/sin inside every consumer,
    per head and per layer (76 `cosine` ops in the default train step, BENCHMARKS.md round 6). Other backends get
    the direct form: recomputing is cheap there, and a conditional waits on the host for its predicate."""
    if jax.default_backend() != "cpu":
        return rope_tables(positions, head_dim, theta)

    def from_table(p):
        cos, sin = rope_tables(jnp.arange(max_len)[None], head_dim, theta)
        return cos[0][p], sin[0][p]

    in_table = (jnp.min(positions) >= 0) & (jnp.max(positions) < max_len)
    return jax.lax.cond(in_table, from_table, lambda p: rope_tables(p, head_dim, theta), positions)


def apply_rope(x, cos, sin):
    """x: [B, T, heads, head_dim]; cos/sin: [B, T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
