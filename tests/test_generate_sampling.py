"""Logits processors and token choice: each matches a NumPy reference of transformers' definition on fixed logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import required_module
from ultrathink_jax.generate.sampling import (GenerationError, SamplingConfig, next_token, process_logits,
                                              repetition_penalty, top_k_filter, top_p_filter)

V = 12
LOGITS = np.random.default_rng(0).normal(size=(3, V)).astype(np.float32) * 2
SEEN = np.zeros((3, V), bool)
SEEN[0, [1, 4, 7]] = SEEN[1, [0, 2]] = SEEN[2, :] = True


def np_penalty(logits, seen, p):
    return np.where(seen, np.where(logits < 0, logits * p, logits / p), logits)


def np_top_k(logits, k):
    kth = np.sort(logits, axis=-1)[:, ::-1][:, k - 1:k]
    return np.where(logits < kth, -np.inf, logits)


def np_top_p(logits, p):
    out = logits.copy()
    for row, l in zip(out, logits):
        probs = np.exp(l - l.max()) / np.exp(l - l.max()).sum()
        order = np.argsort(l, kind="stable")  # ascending
        cumulative = np.cumsum(probs[order])
        drop = cumulative <= 1 - p
        drop[-1] = False
        row[order[drop]] = -np.inf
    return out


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    got = repetition_penalty(jnp.asarray(LOGITS), jnp.asarray(SEEN), 1.7)
    np.testing.assert_allclose(got, np_penalty(LOGITS, SEEN, 1.7), rtol=1e-6)
    assert (np.asarray(got)[~SEEN] == LOGITS[~SEEN]).all(), "unseen tokens must keep their logits"


@pytest.mark.parametrize("k", [1, 3, V])
def test_top_k_keeps_the_k_largest_logits(k):
    got = np.asarray(top_k_filter(jnp.asarray(LOGITS), k))
    np.testing.assert_array_equal(got, np_top_k(LOGITS, k))
    assert (np.isfinite(got).sum(-1) == k).all(), f"kept per row: {np.isfinite(got).sum(-1)}, expected {k}"


def test_top_k_keeps_ties_with_the_kth_logit():
    logits = np.array([[3.0, 1.0, 2.0, 2.0, 0.0]], np.float32)
    got = np.asarray(top_k_filter(jnp.asarray(logits), 2))
    np.testing.assert_array_equal(np.isfinite(got[0]), [True, False, True, True, False])


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_mass_p(p):
    got = np.asarray(top_p_filter(jnp.asarray(LOGITS), p))
    np.testing.assert_array_equal(got, np_top_p(LOGITS, p))


def test_top_p_always_keeps_the_most_likely_token():
    got = np.asarray(top_p_filter(jnp.asarray(LOGITS), 1e-6))
    assert (np.isfinite(got).sum(-1) == 1).all()
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(LOGITS, -1))


def test_process_logits_applies_penalty_temperature_top_k_then_top_p():
    cfg = SamplingConfig(temperature=0.7, top_k=6, top_p=0.8, repetition_penalty=1.3)
    expected = np_top_p(np_top_k(np_penalty(LOGITS, SEEN, 1.3) / 0.7, 6), 0.8)
    np.testing.assert_allclose(process_logits(jnp.asarray(LOGITS), jnp.asarray(SEEN), cfg), expected, rtol=1e-6)


def test_process_logits_matches_transformers_processors():
    torch = required_module("torch")
    gen = required_module("transformers.generation.logits_process")
    ids = torch.tensor([np.flatnonzero(row)[:2].tolist() for row in SEEN])  # two seen ids per row
    seen = np.zeros_like(SEEN)
    seen[np.arange(3)[:, None], ids.numpy()] = True
    processors = gen.LogitsProcessorList([
        gen.RepetitionPenaltyLogitsProcessor(1.3), gen.TemperatureLogitsWarper(0.7), gen.TopKLogitsWarper(6),
        gen.TopPLogitsWarper(0.8)])
    expected = processors(ids, torch.tensor(LOGITS)).numpy()
    cfg = SamplingConfig(temperature=0.7, top_k=6, top_p=0.8, repetition_penalty=1.3)
    np.testing.assert_allclose(process_logits(jnp.asarray(LOGITS), jnp.asarray(seen), cfg), expected, rtol=1e-6)


def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    logits = jnp.asarray([[0.0, 5.0, 5.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    got = next_token(logits, jnp.zeros((2, 4), bool), jax.random.key(0), SamplingConfig())
    np.testing.assert_array_equal(got, [1, 0])


def test_greedy_applies_the_repetition_penalty():
    logits = jnp.asarray([[4.0, 3.0]])
    got = next_token(logits, jnp.asarray([[True, False]]), jax.random.key(0), SamplingConfig(repetition_penalty=2.0))
    assert int(got[0]) == 1, "4/2 < 3, so the unseen token must win"


def test_sampling_frequencies_follow_the_filtered_distribution():
    cfg = SamplingConfig(temperature=1.5, top_k=5)
    row = jnp.asarray(LOGITS[:1])
    keys = jax.random.split(jax.random.key(1), 20000)
    draws = np.asarray(jax.vmap(lambda k: next_token(row, jnp.zeros((1, V), bool), k, cfg)[0])(keys))
    probs = np.asarray(jax.nn.softmax(process_logits(row, jnp.zeros((1, V), bool), cfg)[0]))
    freq = np.bincount(draws, minlength=V) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.015, err_msg=f"frequencies {freq} vs probabilities {probs}")
    assert freq[probs == 0].sum() == 0, "a filtered token was drawn"


def test_sampling_with_top_k_1_is_greedy():
    cfg = SamplingConfig(temperature=2.0, top_k=1)
    got = next_token(jnp.asarray(LOGITS), jnp.asarray(SEEN), jax.random.key(3), cfg)
    np.testing.assert_array_equal(got, np.argmax(LOGITS, -1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature=-0.1 must be >= 0"),
    (dict(temperature=1.0, top_p=0.0), "top_p=0.0 must be in (0, 1]"),
    (dict(temperature=1.0, top_p=1.5), "top_p=1.5 must be in (0, 1]"),
    (dict(top_k=-1), "top_k=-1 must be >= 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0 must be > 0"),
])
def test_bad_sampling_arguments_give_one_clear_line(kwargs, message):
    with pytest.raises(GenerationError) as err:
        SamplingConfig(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
