"""KV-cached generation: agreement with full recomputation, left padding, EOS, seeds, buckets, sharding, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from model_fixtures import logits_of, tiny_config
from ultrathink_jax import sharding
from ultrathink_jax.generate import Engine, GenerationError, SamplingConfig, generate
from ultrathink_jax.params import abstract_params

PROMPTS = [[5, 9, 17], [3, 1, 4, 1, 5, 9, 2, 6], [42]]  # different lengths: rows are left-padded differently
MOE = dict(n_experts=4, n_experts_per_tok=2, moe_d_ff=48, moe_every=2)
SAMPLED = SamplingConfig(temperature=1.0, top_p=0.95)


@functools.lru_cache(maxsize=None)
def model(moe: bool = False):
    """(config, params) with NumPy-filled params of the real tree (jax.random init compiles slowly on CPU).
    Weights are large enough that greedy choices and MoE routing cannot flip on float rounding."""
    cfg = tiny_config(**(MOE if moe else {}))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        std = 1.0 if "router" in jax.tree_util.keystr(path) else 0.15
        return jnp.asarray(rng.normal(size=leaf.shape) * std, jnp.float32)

    return cfg, jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract_params(cfg)))


def stepwise(engine, prompts, max_new_tokens, **kwargs):
    """(per-step last logits [B, V], tokens per row), decoding from Python one step at a time."""
    run = engine.prefill(prompts, max_new_tokens, **kwargs)
    logits = [np.asarray(run.state["logits"])]
    while not run.finished:
        run = engine.step(run)
        logits.append(np.asarray(run.state["logits"]))
    return np.stack(logits, 1), engine.tokens(run)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_cached_decoding_logits_equal_full_recompute(moe):
    cfg, params = model(moe)
    step_logits, tokens = stepwise(Engine(params, cfg), PROMPTS, 6)
    rows = [p + t for p, t in zip(PROMPTS, tokens)]
    width = max(map(len, rows))  # recompute all rows in one batch, right-padded with segment 0
    full = np.asarray(logits_of(cfg, params, [r + [0] * (width - len(r)) for r in rows],
                                [[1] * len(r) + [0] * (width - len(r)) for r in rows]))
    for r, prompt in enumerate(PROMPTS):
        expected = full[r, len(prompt) - 1:len(prompt) - 1 + len(tokens[r])]  # logits that chose each new token
        err = np.abs(step_logits[r, :len(tokens[r])] - expected).max()
        assert err < 1e-5, f"row {r}: max |cached - full| = {err:.2e}"
        np.testing.assert_array_equal(tokens[r], expected.argmax(-1), err_msg=f"row {r}: greedy is not argmax")


def test_device_loop_and_streaming_loop_give_the_same_samples():
    cfg, params = model()
    engine = Engine(params, cfg)
    streamed = [[] for _ in PROMPTS]
    from_stream = engine.generate(PROMPTS, 9, SAMPLED, seed=7, on_token=lambda r, t: streamed[r].append(t))
    on_device = engine.generate(PROMPTS, 9, SAMPLED, seed=7)
    assert from_stream == on_device == streamed


def test_a_fixed_seed_reproduces_samples_and_another_seed_changes_them():
    cfg, params = model()
    sample = functools.partial(Engine(params, cfg).generate, PROMPTS, 12, SAMPLED)
    first = sample(seed=3)
    assert sample(seed=3) == first
    assert sample(seed=4) != first


def test_eos_stops_its_row_while_the_others_continue():
    cfg, params = model()
    free = generate(params, cfg, PROMPTS, 10)
    eos = next(t for t in free[0][1:] if all(t not in row[:10] for row in free[1:]))  # only row 0 emits it
    got = generate(params, cfg, PROMPTS, 10, eos_id=eos)
    stop = free[0].index(eos) + 1
    assert got[0] == free[0][:stop], f"row 0 should end at its first EOS: {got[0]} vs {free[0]}"
    assert got[1:] == free[1:] and all(len(row) == 10 for row in got[1:])


def test_rows_stop_at_the_models_context_length():
    cfg, params = model()
    near_full = list(range(1, cfg.max_seq_len - 2))  # room for 3 more positions
    got = generate(params, cfg, [near_full, [7, 8]], 10)
    assert [len(row) for row in got] == [3, 10]


def test_prompts_in_the_same_bucket_reuse_the_compiled_programs(monkeypatch):
    """Counts traces (jit traces again exactly when it must compile again): the sampling step runs in Python
    once per trace of prefill and of the decode loop."""
    from ultrathink_jax.generate import engine as engine_lib

    traces = []

    def counted(*args, **kwargs):
        traces.append(1)
        return real(*args, **kwargs)

    real = engine_lib.choose_token
    monkeypatch.setattr(engine_lib, "choose_token", counted)
    cfg, params = model()
    engine = Engine(params, cfg)
    sampling = SamplingConfig(temperature=0.625)  # settings no other test uses: programs built afresh here
    engine.generate([[1, 2, 3], [4]], 5, sampling=sampling)
    first = len(traces)
    assert first >= 2, f"{first} traces for one prefill + decode"
    engine.generate([[4, 5, 6, 7, 8, 9, 10], [11]], 7, sampling=sampling)  # other lengths, same buckets
    engine.generate([[12, 13], [14, 15, 16]], 12, eos_id=3, sampling=sampling)
    assert len(traces) == first, f"{len(traces) - first} new traces for prompts in the same buckets"
    engine.generate([[1] * 20, [2]], 5, sampling=sampling)  # width 32: a new bucket must trace again
    assert len(traces) > first, "a new bucket was not traced: the count does not see compilations"


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_sharded_generation_on_8_devices_matches_one_device(moe):
    cfg, params = model(moe)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2} if not moe else {"fsdp": 2, "expert": 4})
    one, _ = stepwise(Engine(params, cfg), PROMPTS, 5)
    eight, tokens = stepwise(Engine(params, cfg, mesh), PROMPTS, 5)
    assert tokens == generate(params, cfg, PROMPTS, 5)
    err = np.abs(one[:len(PROMPTS)] - eight[:len(PROMPTS)]).max()
    assert err < 1e-4, f"max |8 devices - 1 device| logits = {err:.2e}"


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([], {}, "no prompts given"),
    ([list(range(64))], {}, "prompt 0 has 64 tokens; the model's context is max_seq_len=64"),
    ([[1, 128]], {}, "prompt 0 has token id 128 outside the vocabulary [0, 128)"),
    ([[1]], dict(max_new_tokens=0), "max_new_tokens=0 must be >= 1"),
    ([[1]], dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
    ([[1]], dict(temperature=1.0, top_p=1.2), "top_p=1.2 must be in (0, 1]"),
])
def test_bad_arguments_give_one_clear_line(prompts, kwargs, message):
    cfg, params = model()
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(GenerationError) as err:
        generate(params, cfg, prompts, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("layers", [dict(), dict(n_layers=5, n_experts=4, moe_d_ff=48, moe_first_dense=1)],
                         ids=["dense", "dense+moe+dense stages"])
def test_decode_loop_does_not_slice_the_stacked_layer_weights_per_token(layers):
    """The on-device decode loop reads each unit's weights as they are (sliced once, before the loop): slicing the
    stacked [n_units, ...] params inside the loop copied every unit's weights on every token on XLA:CPU."""
    from ultrathink_jax.generate import engine as engine_lib

    cfg = tiny_config(**layers)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.15, jnp.float32),
                          nn.unbox(abstract_params(cfg)))
    engine = Engine(params, cfg)
    run = engine.prefill(PROMPTS, 4)
    _, _, decode = engine_lib._programs(engine.config, run.sampling, engine.mesh)
    with sharding.activate(engine.mesh):
        hlo = decode.lower(engine.params, run.state).compile().as_text()
    body_slices = [line for line in hlo.splitlines()
                   if " slice(" in line and "while/body/Transformer/slice" in line and " f32[" in line]
    assert body_slices == []
    # and the loop still decodes what stepping from Python decodes
    assert engine.tokens(engine.decode(engine.prefill(PROMPTS, 4))) == stepwise(engine, PROMPTS, 4)[1]
