"""KV-cached generation: one jitted prefill, then a jitted decode step over a preallocated cache.

Shapes are bucketed (batch, prompt length and number of new tokens round up to powers of two), so a new prompt
compiles nothing unless it lands in a new bucket, and decoding never compiles per token. Prompts are left-padded:
padding has segment id 0 (the model's mask keeps it out of real tokens' attention), real tokens segment 1 with
positions counting from 0 at each row's first token, so every row's next token is read at the same column.

The cache is donated to every step and rides in the layer scan's carry (`model.Unit`, `write_cache`), so a step
writes only the new position of each layer's k/v, in place, instead of copying the whole cache through the scan.

Two decode paths share one step function and one per-step key (`fold_in(seed, step)`), so they give the same
tokens: a `lax.while_loop` running on device until every row is done (fast), or a Python loop that hands each
new token to a callback (streaming).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ultrathink_jax import sharding
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.generate import layerwise
from ultrathink_jax.generate.sampling import GenerationError, SamplingConfig, next_token
from ultrathink_jax.model import Transformer, init_cache
from ultrathink_jax.params import param_shardings

PAD_ID = 0  # what padding rows and finished rows hold; never attended to or returned
MIN_BUCKET = 16

OnToken = Callable[[int, int], None]  # (row, token id), called as each row produces a token


@dataclasses.dataclass
class Run:
    """One batch in flight: the device state plus what the host needs to read it back."""

    state: dict  # cache, token, position, done, seen, budget, out, length, logits, step, key, eos
    n_rows: int  # real rows; the rest pad the batch to its bucket
    sampling: SamplingConfig

    @property
    def finished(self) -> bool:
        return bool(jnp.all(self.state["done"]))


def token_budget(config: ModelConfig, prompt_len: int, max_new_tokens: int) -> int:
    """How many tokens a row may produce: max_new_tokens, cut where the row would pass the model's context."""
    return min(max_new_tokens, config.max_seq_len - prompt_len)


def bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def _cache_sharding(mesh: Mesh, cache):
    """KV cache laid out like the activations it stores: batch over data axes, kv heads over tensor."""
    def one(x):
        axes = {0: (), 2: ("act_batch", None), 5: (None, "act_batch", "act_kv_heads", None, None)}[x.ndim]
        return sharding.logical_sharding(mesh, axes)
    return jax.tree.map(one, cache)


def choose_token(state, logits, step, sampling: SamplingConfig):
    """Picks each live row's token for `step`; updates done/seen/out. Finished rows stay as they are."""
    rows = jnp.arange(logits.shape[0])
    live = ~state["done"]
    token = next_token(logits, state["seen"], jax.random.fold_in(state["key"], step), sampling)
    token = jnp.where(live, token, PAD_ID)
    length = state["length"] + live
    done = state["done"] | (live & ((token == state["eos"]) | (length >= state["budget"])))
    return {**state, "token": token, "logits": logits, "length": length, "done": done, "step": step + 1,
            "seen": state["seen"].at[rows, token].set(state["seen"][rows, token] | live),
            "out": jax.lax.dynamic_update_slice_in_dim(state["out"], token[:, None], step, axis=1)}


@functools.lru_cache(maxsize=None)
def _programs(config: ModelConfig, sampling: SamplingConfig, mesh: Mesh):
    """Jitted (prefill, step, decode-to-the-end) for one model config and sampling setting."""
    model = Transformer(config)

    def forward(params, tokens, positions, segment_ids, cache):
        logits, _, cache = model.apply({"params": params}, tokens, positions, segment_ids, cache)
        return logits[:, -1], cache

    choose = functools.partial(choose_token, sampling=sampling)

    def prefill(params, tokens, positions, segment_ids, seen, budget, key, eos, *, cache_len, n_new):
        """`cache_len` / `n_new` may exceed what plain decoding needs: speculative rounds write past the budget."""
        batch = tokens.shape[0]
        cache = init_cache(config, batch, cache_len)
        cache = jax.lax.with_sharding_constraint(cache, _cache_sharding(mesh, cache))
        logits, cache = forward(params, tokens, positions, segment_ids, cache)
        state = {"cache": cache, "position": positions[:, -1] + 1, "done": budget <= 0, "seen": seen,
                 "budget": budget, "length": jnp.zeros_like(budget), "out": jnp.zeros((batch, n_new), jnp.int32),
                 "key": key, "eos": eos}
        return choose(state, logits, jnp.zeros((), jnp.int32))

    def step(params, state):
        # finished and batch-filler rows feed padding (segment 0): MoE layers then leave them out of routing
        segment_ids = jnp.where(state["done"], 0, 1)[:, None]
        logits, cache = forward(params, state["token"][:, None], state["position"][:, None], segment_ids,
                                state["cache"])
        state = {**state, "cache": cache, "position": state["position"] + 1}
        return choose(state, logits, state["step"])

    def decode(params, state):
        n_new = state["out"].shape[1]
        # Sliced once here and stacked again inside the loop, where XLA folds each unit's slice of that stack
        # to the piece itself: slicing the stacked params inside the loop copied every unit's weights on every
        # token, because XLA:CPU does not hoist those slices out of the while loop.
        layers = layerwise.unstack_layers(params, config)
        return jax.lax.while_loop(lambda s: (s["step"] < n_new) & ~jnp.all(s["done"]),
                                  lambda s: step(layerwise.stack_layers(params, config, layers), s), state)

    return (jax.jit(prefill, static_argnames=("cache_len", "n_new")),
            jax.jit(step, donate_argnums=1), jax.jit(decode, donate_argnums=1))


def _check_prompts(prompts: Sequence[Sequence[int]], config: ModelConfig, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not prompts:
        raise GenerationError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty (it needs at least one token)")
        if len(p) >= config.max_seq_len:
            raise GenerationError(f"prompt {i} has {len(p)} tokens; the model's context is "
                                  f"max_seq_len={config.max_seq_len}, leaving no room for a new token")
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {config.vocab_size})")


class Engine:
    """Generates from one model's params on one mesh (default: the first device).

    `params` are the plain float32 tree of `init_params` / a checkpoint; they are placed on `mesh` with the
    training layout, so a model that trained sharded also generates sharded.
    """

    def __init__(self, params, config: ModelConfig, mesh: Mesh | None = None):
        self.config = config
        self.mesh = mesh or sharding.make_mesh({}, jax.devices()[:1])
        self.params = jax.device_put(params, param_shardings(config, self.mesh))

    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                sampling: SamplingConfig = SamplingConfig(), eos_id: int | None = None, seed: int = 0,
                slack: int = 0) -> Run:
        """Runs the prompts through the model and picks each row's first new token.

        A row produces at most `max_new_tokens` tokens and never runs past the model's context
        (`max_seq_len` positions); it stops after emitting `eos_id`. `slack` extra cache and output columns are
        for decoders that write several tokens per step (generate/speculative.py).
        """
        cfg = self.config
        _check_prompts(prompts, cfg, max_new_tokens)
        n = len(prompts)
        shards = sharding.data_parallel_size(self.mesh)  # batch sizes are rounded up to a multiple
        batch = -(-(1 << (n - 1).bit_length()) // shards) * shards  # a power of two, split evenly over the mesh
        width = bucket(max(len(p) for p in prompts))
        tokens = np.full((batch, width), PAD_ID, np.int32)
        segment_ids = np.zeros((batch, width), np.int32)
        positions = np.zeros((batch, width), np.int32)
        seen = np.zeros((batch, cfg.vocab_size), bool)
        budget = np.zeros(batch, np.int32)  # padding rows: 0 = done before they start
        for r, p in enumerate(prompts):
            tokens[r, width - len(p):] = p
            segment_ids[r, width - len(p):] = 1
            positions[r, width - len(p):] = np.arange(len(p))
            seen[r, list(p)] = True
            budget[r] = token_budget(cfg, len(p), max_new_tokens)
        n_new = bucket(int(budget.max()))
        prefill, _, _ = _programs(cfg, sampling, self.mesh)
        on_batch = sharding.batch_sharding(self.mesh)
        put = lambda x: jax.device_put(x, on_batch if x.ndim == 2 else sharding.batch_sharding(self.mesh, 1))
        with sharding.activate(self.mesh):
            state = prefill(self.params, *map(put, (tokens, positions, segment_ids, seen, budget)),
                            jax.random.key(seed), jnp.int32(-1 if eos_id is None else eos_id),
                            cache_len=width + n_new + slack, n_new=n_new + slack)
        return Run(state, n, sampling)

    def step(self, run: Run) -> Run:
        """One more token for every live row (the previous state's buffers are donated)."""
        _, step, _ = _programs(self.config, run.sampling, self.mesh)
        with sharding.activate(self.mesh):
            return Run(step(self.params, run.state), run.n_rows, run.sampling)

    def decode(self, run: Run, on_token: OnToken | None = None) -> Run:
        """Decodes until every row is done. With `on_token`, steps from Python and reports each token as it comes;
        without, the whole loop runs on device."""
        if on_token is None:
            _, _, decode = _programs(self.config, run.sampling, self.mesh)
            with sharding.activate(self.mesh):
                return Run(decode(self.params, run.state), run.n_rows, run.sampling)
        n_new = run.state["out"].shape[1]
        length = np.zeros(run.n_rows, np.int32)
        while True:
            token, new_length = np.asarray(run.state["token"]), np.asarray(run.state["length"])[:run.n_rows]
            for r in np.flatnonzero(new_length > length):  # the rows that were live in the last step
                on_token(int(r), int(token[r]))
            length = new_length
            if run.finished or int(run.state["step"]) >= n_new:
                return run
            run = self.step(run)

    @staticmethod
    def tokens(run: Run) -> list[list[int]]:
        """Each real row's new tokens, ending with the EOS token if it produced one."""
        out, length = np.asarray(run.state["out"]), np.asarray(run.state["length"])
        return [out[r, :length[r]].tolist() for r in range(run.n_rows)]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), eos_id: int | None = None, seed: int = 0,
                 on_token: OnToken | None = None) -> list[list[int]]:
        run = self.prefill(prompts, max_new_tokens, sampling, eos_id, seed)
        return self.tokens(self.decode(run, on_token))


def generate(params, config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             eos_id: int | None = None, seed: int = 0, mesh: Mesh | None = None,
             on_token: OnToken | None = None) -> list[list[int]]:
    """New token ids per prompt (EOS included when produced). temperature 0 = greedy argmax, ties to the lowest id."""
    sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty)
    return Engine(params, config, mesh).generate(prompts, max_new_tokens, sampling, eos_id, seed, on_token)
