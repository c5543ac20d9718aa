"""Adaptive-depth decoding: self-speculative decoding (exactly the full model's output) and CALM early exit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_fixtures import init, jitted_apply, row_inputs, tiny_config
from ultrathink_jax.generate import Engine, GenerationError, SamplingConfig
from ultrathink_jax.generate import layerwise
from ultrathink_jax import metrics
from ultrathink_jax.generate.early_exit import (EarlyExitConfig, EarlyExitEngine, check_flops, evaluate, flops_saved,
                                                parse_layers)
from ultrathink_jax.generate.speculative import SpeculativeConfig, SpeculativeEngine
from ultrathink_jax.model import init_cache, Transformer

DENSE = tiny_config(n_layers=3, vocab_size=64)
MOE = tiny_config(n_layers=4, vocab_size=64, n_experts=4, n_experts_per_tok=2, moe_every=2)


@pytest.fixture(scope="module")
def dense():
    return Engine(init(DENSE), DENSE)


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 64, rng.integers(1, 12)).tolist() for _ in range(n)]


@pytest.mark.parametrize("name,draft_layers,k", [("dense", 1, 3), ("moe", 1, 4)])
def test_speculative_greedy_equals_plain_greedy_token_for_token(dense, name, draft_layers, k):
    engine = dense if name == "dense" else Engine(init(MOE, seed=1), MOE)
    ps = prompts(6, seed=draft_layers)
    plain = engine.generate(ps, 24)
    eos = plain[0][6]  # a token the model really produces: rows stop at different points
    plain_eos = engine.generate(ps, 24, eos_id=eos)
    spec = SpeculativeEngine(engine, SpeculativeConfig(draft_layers, k))
    got, stats = spec.generate(ps, 24, eos_id=eos)
    assert got == plain_eos, f"speculative {got}\nplain {plain_eos}"
    assert any(len(t) < 24 for t in got) and got[0][-1] == eos
    single, _ = spec.generate(ps[:1], 24)
    assert single == plain[:1]
    # Rows commit the batch's common accepted prefix, so on random weights a batch may gain nothing per round
    # (tokens_per_round 1) although drafts are accepted in some rows.
    assert 0 < stats.acceptance_rate <= 1 and stats.tokens_per_round >= 1 and stats.rounds > 0, stats


def exact_two_token_distribution(config, params, prompt, n_layers=None):
    """P(t1, t2 | prompt) [V, V] of the model (cut after `n_layers` layers: the draft) at temperature 1."""
    if n_layers is not None:
        config = dataclasses.replace(config, n_layers=n_layers)
        params = {**params, "layers": jax.tree.map(lambda a: a[:n_layers], params["layers"])}
    V = config.vocab_size
    seqs = np.asarray([prompt + [t] for t in range(V)], np.int32)
    logits = jax.jit(lambda p, *a: Transformer(config).apply({"params": p}, *a)[0])(params, *row_inputs(seqs))
    p1 = jax.nn.softmax(logits[0, len(prompt) - 1])
    p2 = jax.nn.softmax(logits[:, len(prompt)], -1)  # row t: P(t2 | prompt, t1 = t)
    return np.asarray(p1[:, None] * p2, np.float64)


def test_speculative_sampling_has_the_full_models_distribution():
    config = tiny_config(n_layers=2, vocab_size=8, init_std=0.4)  # peaked, and the 1-layer draft differs
    params = init(config, seed=3)
    prompt, n = [1, 2, 3], 8192
    full = exact_two_token_distribution(config, params, prompt)
    draft = exact_two_token_distribution(config, params, prompt, n_layers=1)
    engine = SpeculativeEngine(Engine(params, config), SpeculativeConfig(1, 2))
    rows, stats = engine.generate([prompt] * n, 2, SamplingConfig(temperature=1.0), seed=0)
    counts = np.zeros((8, 8))
    for t1, t2 in rows:
        counts[t1, t2] += 1
    empirical = counts / n
    tv = 0.5 * np.abs(empirical - full).sum()
    tv_draft = 0.5 * np.abs(draft - full).sum()
    expected = full * n
    keep = expected >= 5  # chi-square cells; pooled tail below
    chi2 = (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum()
    dof = keep.sum()
    assert stats.acceptance_rate < 0.95, "the draft should be rejected sometimes, or the residual path is untested"
    assert tv_draft > 0.1, f"draft too close to the full model ({tv_draft:.3f}) for the test to have power"
    assert tv < 0.05, f"total variation to the full model {tv:.3f} (draft is {tv_draft:.3f} away)"
    assert chi2 < dof + 5 * np.sqrt(2 * dof), f"chi2 {chi2:.1f} on {dof} cells"


def test_speculative_rejects_bad_settings(dense):
    with pytest.raises(GenerationError, match="speculative_draft_layers=3 must be in"):
        SpeculativeEngine(dense, SpeculativeConfig(3, 2)).generate(prompts(1), 4)
    with pytest.raises(GenerationError, match="speculative_k=0"):
        SpeculativeEngine(dense, SpeculativeConfig(1, 0)).generate(prompts(1), 4)
    with pytest.raises(GenerationError, match="repetition_penalty"):
        SpeculativeEngine(dense, SpeculativeConfig(1, 2)).generate(prompts(1), 4,
                                                                   SamplingConfig(repetition_penalty=1.2))


def test_filled_kv_equals_what_the_layer_itself_writes():
    params = init(DENSE)
    slot = layerwise.layer_slots(DENSE)[1]
    layer = layerwise.unstack_layers(params, DENSE)[1]
    x = jax.random.normal(jax.random.key(0), (2, 1, DENSE.d_model))
    cache = layerwise.split_cache(DENSE, init_cache(DENSE, 2, 8))
    ctx, cache = layerwise.context(DENSE, jnp.full((2, 1), 3), jnp.ones((2, 1), jnp.int32),
                                   {**cache, "index": jnp.int32(3)})
    _, ran = layerwise.run_layer(DENSE, slot, layer, x, ctx, cache)
    filled = layerwise.fill_kv(DENSE, slot, layer, x, ctx, cache)
    for n in ("k", "v"):
        a, b = ran["layers"][1][n], filled["layers"][1][n]
        assert np.allclose(a, b, atol=1e-6) and np.abs(a[:, 3]).sum() > 0


def test_early_exit_at_threshold_one_is_plain_decoding(dense):
    ps = prompts(3)
    got, stats = EarlyExitEngine(dense, EarlyExitConfig(1.0)).generate(ps, 12)
    assert got == dense.generate(ps, 12)
    assert stats.mean_depth == DENSE.n_layers and stats.layer_flops_saved == 0


@pytest.mark.parametrize("measure", ["max_prob", "margin"])
def test_early_exit_with_a_low_threshold_exits_after_the_first_layer(dense, measure):
    got, stats = EarlyExitEngine(dense, EarlyExitConfig(1e-9, measure)).generate(prompts(2), 12)
    assert stats.mean_depth == 1.0
    assert stats.layer_flops_saved == pytest.approx(flops_saved(DENSE, np.asarray([1.0]), EarlyExitConfig(0.5))[0])
    assert 0.5 < stats.layer_flops_saved < 2 / 3  # 2 of 3 layers skipped, less their k/v projections
    assert all(len(t) == 12 for t in got)


def truncated(engine, n_layers):
    """The engine's model cut after its first `n_layers` layers (same embedding, final norm and head)."""
    config = dataclasses.replace(engine.config, n_layers=n_layers)
    params = {**engine.params, "layers": jax.tree.map(lambda a: a[:n_layers], engine.params["layers"])}
    return Engine(params, config)


@pytest.mark.parametrize("measure", ["max_prob", "saturation"])
def test_exiting_at_a_chosen_layer_decodes_like_the_model_cut_there(dense, measure):
    # Only layer 1 is a candidate and every token passes: after the (full-depth) prefill's first token the output is
    # the 2-layer model's greedy continuation (layer 2 only receives copied k/v, which the head never reads),
    # whichever measure decided; teacher-forced, the perplexity is the 2-layer model's.
    ps = prompts(3, seed=1)
    ee = EarlyExitConfig(1e-9, measure, layers=(1,))
    got, stats = EarlyExitEngine(dense, ee).generate(ps, 10)
    cut = truncated(dense, 2)
    assert [g[1:] for g in got] == cut.generate([p + g[:1] for p, g in zip(ps, got)], 9)
    assert stats.mean_depth == 2.0
    one_check = check_flops(DENSE, measure) / (metrics.matmul_params_per_token(DENSE) - DENSE.d_model * 64)
    assert stats.check_cost == pytest.approx(one_check)
    assert stats.net_flops_saved == pytest.approx(stats.layer_flops_saved - stats.check_cost)
    tokens = np.random.default_rng(0).integers(1, 64, (2, 16))
    exit_ppl = evaluate(dense.params, DENSE, tokens, ee).perplexity
    assert exit_ppl == pytest.approx(evaluate(cut.params, cut.config, tokens, EarlyExitConfig(1.0)).full_perplexity,
                                     rel=1e-5)


def test_check_cost_counts_one_check_per_candidate_layer_a_token_ran():
    full = metrics.matmul_params_per_token(DENSE) - DENSE.d_model * DENSE.vocab_size  # the 3 layers' matmuls
    for measure, one in (("max_prob", DENSE.d_model * DENSE.vocab_size), ("saturation", 3 * DENSE.d_model)):
        for layers, depths, checks in (((), [3, 1, 2], (2 + 1 + 2) / 3), ((1,), [3, 2], 1), ((1,), [1], 0)):
            _, cost = flops_saved(DENSE, np.asarray(depths), EarlyExitConfig(0.5, measure, layers))
            assert cost == pytest.approx(checks * one / full), (measure, layers, depths)
    assert check_flops(DENSE, "saturation") < check_flops(DENSE, "max_prob") / 10


def test_saturation_exits_where_the_hidden_state_stops_turning(dense):
    # A layer's output is x + (attention + MLP); at random init the update is about a third of |x|, so the cosine of
    # input and output is 0.89-0.97: 0.5 lets every token out at the first candidate, 1.0 none.
    ps = prompts(2, seed=2)
    _, low = EarlyExitEngine(dense, EarlyExitConfig(0.5, "saturation")).generate(ps, 8)
    assert low.mean_depth == 1.0
    got, high = EarlyExitEngine(dense, EarlyExitConfig(1.0, "saturation", layers=(0,))).generate(ps, 8)
    assert high.mean_depth == DENSE.n_layers and got == dense.generate(ps, 8)


def test_held_out_evaluation_compares_exit_and_full_perplexity(dense):
    tokens = np.random.default_rng(0).integers(1, 64, (2, 16))
    same = evaluate(dense.params, DENSE, tokens, EarlyExitConfig(1.0))
    assert same.perplexity == pytest.approx(same.full_perplexity, rel=1e-5) and same.greedy_agreement == 1.0
    low = evaluate(dense.params, DENSE, tokens, EarlyExitConfig(1e-9))
    assert low.mean_depth == 1.0 and low.perplexity != pytest.approx(low.full_perplexity, rel=1e-3)


def test_early_exit_rejects_bad_settings(dense):
    for ee, msg in [(EarlyExitConfig(0.0), "early_exit_threshold=0.0"),
                    (EarlyExitConfig(0.5, "entropy"), "early_exit_measure='entropy'"),
                    (EarlyExitConfig(0.5, layers=(2,)), r"early_exit_layers=2 must be increasing layer indices in \[0, "
                                                         r"n_layers - 1 = 2\)"),
                    (EarlyExitConfig(0.5, layers=(1, 0)), "early_exit_layers=1,0 must be increasing"),
                    (EarlyExitConfig(0.5, layers=(1, 1)), "early_exit_layers=1,1 must be increasing")]:
        with pytest.raises(GenerationError, match=msg):
            EarlyExitEngine(dense, ee)
    assert parse_layers("0, 1,") == (0, 1) and parse_layers("") == ()
    with pytest.raises(GenerationError, match="early_exit_layers='1,x' must be comma-separated"):
        parse_layers("1,x")


def test_speculative_and_early_exit_on_8_devices_match_one_device(dense):
    from ultrathink_jax import sharding

    ps = prompts(6, seed=5)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = Engine(init(DENSE), DENSE, mesh)
    got, _ = SpeculativeEngine(sharded, SpeculativeConfig(1, 3)).generate(ps, 12)
    assert got == dense.generate(ps, 12)
    for threshold in (1e-9, 1.0):  # every token exits after layer 0 (KV filled), or none does; one compile
        ee = EarlyExitConfig(threshold)
        (one, one_stats), (eight, eight_stats) = (EarlyExitEngine(e, ee).generate(ps, 12) for e in (dense, sharded))
        assert eight == one and eight_stats.mean_depth == one_stats.mean_depth, (threshold, eight_stats, one_stats)
