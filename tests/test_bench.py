"""The benchmarks run (on tiny shapes; no timing is asserted) and the FLOPs formula MFU rests on matches a hand count."""

import pytest

from ultrathink_jax import metrics
from ultrathink_jax.bench import train as bench_train
from ultrathink_jax.config import ModelConfig


def test_moe_flops_per_token_matches_a_hand_count():
    config = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64,
                         n_experts=4, n_experts_per_tok=2, moe_d_ff=32, moe_every=2, moe_first_dense=0)
    # per layer: q, o 64x64 each; k, v 64x32 each (2 KV heads x head_dim 16) = 12,288 attention weights.
    # layer 0 dense SwiGLU 3 x 64 x 128 = 24,576; layer 1 MoE: router 64 x 4 + 2 active experts x 3 x 64 x 32 = 12,544.
    # tied output projection 256 x 64 = 16,384. Attention: 12 x 2 layers x 4 heads x 16 x 32 context = 49,152.
    weights = 2 * 12_288 + 24_576 + 12_544 + 16_384
    assert [config.is_moe_layer(i) for i in range(2)] == [False, True]
    assert metrics.flops_per_token(config, 32) == 6 * weights + 49_152


@pytest.fixture(scope="module")
def tiny_cases():
    return {c.name: c for c in bench_train.cases(quick=True)}


@pytest.mark.parametrize("name", ["tiny dense", "tiny moe dropless"])
def test_train_bench_runs_jax_and_the_eager_twin_on_the_same_loss(tiny_cases, name):
    r = bench_train.measure(tiny_cases[name], repeats=1, warmup=1, torch_compile=False)
    assert set(r["step_s"]) == {"jax", "eager"} and all(s > 0 for s in r["step_s"].values())
    # the same exported weights and batch: the first step's cross-entropy agrees
    assert r["first_loss"]["jax"] == pytest.approx(r["first_loss"]["eager"], rel=1e-4), r["first_loss"]
    assert r["peak"] > 0 and r["flops_per_token"] == metrics.flops_per_token(r["model"], 16)


def test_train_bench_capacity_case_runs_without_a_twin(tiny_cases):
    r = bench_train.measure(tiny_cases["tiny moe capacity"], repeats=1, warmup=1)
    assert set(r["step_s"]) == {"jax"}


def test_train_bench_times_dropless_and_capacity_interleaved(tiny_cases):
    pair = [tiny_cases["tiny moe dropless"], tiny_cases["tiny moe capacity"]]
    times = bench_train.interleaved_jax_steps(pair, repeats=1, warmup=1)
    assert set(times) == {"tiny moe dropless", "tiny moe capacity"} and all(t > 0 for t in times.values())


def test_adaptive_bench_times_the_layerskip_step_against_the_plain_one():
    from ultrathink_jax.bench import adaptive
    from ultrathink_jax.train.layerskip import LayerSkipConfig

    model = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=128)
    ratio = adaptive._step_cost(model, LayerSkipConfig(exit_layers=(0,), layer_dropout_max=0.1), steps=1)
    assert ratio > 0


def test_machine_line_names_the_cpu_model_and_its_vector_extension():
    from ultrathink_jax.bench import machine

    avx512 = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse2 avx2 avx512f fma\n"
    avx2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13 64-Core Processor\nflags\t\t: fpu sse2 avx2 fma\n"
    assert machine.cpu_model(avx512) == "Intel(R) Xeon(R) Processor (AVX-512)"
    assert machine.cpu_model(avx2) == "AMD EPYC 7B13 64-Core Processor (AVX2)"
    assert machine.cpu_model("flags\t: avx2\n") == ""  # no model name: describe() falls back to platform
