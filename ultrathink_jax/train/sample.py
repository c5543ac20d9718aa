"""A short text sample from a trained model: prefill the prompt into a KV cache, then decode token by token."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ultrathink_jax.config import ModelConfig
from ultrathink_jax.data import Tokenizer
from ultrathink_jax.model import Transformer, init_cache


@functools.partial(jax.jit, static_argnames=("config", "n_tokens", "temperature"))
def _generate(params, prompt, key, *, config: ModelConfig, n_tokens: int, temperature: float):
    model = Transformer(config)
    length = prompt.shape[1]
    cache = init_cache(config, 1, length + n_tokens)
    ones = jnp.ones_like(prompt)
    logits, _, cache = model.apply({"params": params}, prompt, jnp.arange(length)[None], ones, cache=cache)

    def pick(logits, key):
        if temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

    def step(carry, i):
        token, cache, key = carry
        key, sub = jax.random.split(key)
        logits, _, cache = model.apply({"params": params}, token[:, None], (length + i)[None, None],
                                       jnp.ones((1, 1), jnp.int32), cache=cache)
        nxt = pick(logits[:, -1], sub)
        return (nxt, cache, key), nxt[0]

    key, sub = jax.random.split(key)
    first = pick(logits[:, -1], sub)
    _, rest = jax.lax.scan(step, (first, cache, key), jnp.arange(n_tokens - 1))
    return jnp.concatenate([first, rest])


def sample_text(config: ModelConfig, params, tokenizer: Tokenizer, prompt: str, n_tokens: int,
                temperature: float = 0.8, seed: int = 0) -> str:
    """The prompt followed by `n_tokens` generated tokens (fewer if max_seq_len is reached), decoded."""
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]  # an empty prompt starts a fresh document
    n_tokens = min(n_tokens, config.max_seq_len - len(ids))
    if n_tokens <= 0:
        return prompt
    out = _generate(params, jnp.asarray([ids], jnp.int32), jax.random.PRNGKey(seed), config=config,
                    n_tokens=n_tokens, temperature=float(temperature))
    return prompt + tokenizer.decode(jax.device_get(out).tolist())
