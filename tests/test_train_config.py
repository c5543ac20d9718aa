"""Config sections, presets and throughput accounting: defaults validate, bad values are named, FLOPs add up."""

import argparse
import io
import logging

import jax
import numpy as np
import pytest

from ultrathink_jax import config_files, metrics
from ultrathink_jax.config import ConfigError, ModelConfig
from ultrathink_jax.configs import base, benchmark, default
from ultrathink_jax.params import abstract_params
from ultrathink_jax.train.config import validate, warmup_steps
from ultrathink_jax.train.optim import learning_rate_schedule
from ultrathink_jax.train.run import resolve_model_config
from ultrathink_jax.train.state import strip_boxes


def test_every_section_is_present_and_the_defaults_validate():
    config = base.get_config()
    assert sorted(config) == ["checkpoint", "data", "eval", "log", "mesh", "model", "optim", "train"]
    validate(config)
    validate(default.get_config())


def test_benchmark_config_reproduces_the_original_settings():
    c = benchmark.get_config()
    validate(c)
    o = c.optim
    assert (o.learning_rate, o.weight_decay, warmup_steps(o, c.train.steps), o.schedule, o.grad_clip) == \
        (3e-4, 0.1, 2000, "cosine", 1.0)
    assert (c.train.grad_accum, c.data.seq_len, c.model.vocab_size, c.model.rope_theta) == (4, 2048, 50257, 10000.0)
    assert (c.data.global_batch_size, c.data.tokenizer, c.model.dtype) == (32, "builtin:gpt2", "bfloat16")


def test_warmup_is_a_fraction_of_the_steps_so_overriding_steps_scales_it():
    _, config = config_files.parse_config_args(argparse.ArgumentParser(), ["--config=configs/small.py",
                                                                     "--config.train.steps=2000"])
    assert (config.optim.warmup_steps, config.optim.warmup_fraction) == (-1, 0.02)
    assert warmup_steps(config.optim, config.train.steps) == 40
    lr = learning_rate_schedule(config.optim, config.train.steps)
    peak = config.optim.learning_rate
    assert float(lr(38)) < peak and float(lr(39)) == pytest.approx(peak) and float(lr(1000)) < peak


def test_explicit_warmup_steps_take_precedence_over_the_fraction():
    config = default.get_config()
    config.optim.update(warmup_steps=7, warmup_fraction=0.5)
    assert warmup_steps(config.optim, config.train.steps) == 7
    config.optim.warmup_steps = 0
    lr = learning_rate_schedule(config.optim, config.train.steps)
    assert float(lr(0)) == pytest.approx(config.optim.learning_rate)


@pytest.mark.parametrize("key, value, message", [
    ("optim.schedule", "exponential", "optim.schedule='exponential' must be one of"),
    ("train.grad_accum", 3, "data.global_batch_size=16 must be divisible by train.grad_accum=3"),
    ("train.row_groups", 3, "train.row_groups=3 must divide the micro-batch's 16 rows"),
    ("train.row_groups", -1, "train.row_groups=-1 must be >= 0"),
    ("checkpoint.max_to_keep", 0, "checkpoint.max_to_keep=0 must be positive"),
    ("optim.warmup_steps", 100_000, "optim.warmup_steps=100000 must be < train.steps=100000 (the whole run would"),
    ("optim.warmup_steps", -2, "optim.warmup_steps=-2 must be >= 0, or -1 = warmup_fraction"),
    ("optim.warmup_fraction", 1.0, "optim.warmup_fraction=1.0 must be in"),
])
def test_unusable_values_are_named(key, value, message):
    config = base.get_config()
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(config)


def test_vocab_size_zero_takes_the_tokenizer_vocabulary_rounded_up_to_64():
    config = default.get_config()
    assert resolve_model_config(config, 2000).vocab_size == 2048
    assert resolve_model_config(config, 2049).vocab_size == 2112
    config.model.vocab_size = 1000
    with pytest.raises(ConfigError, match="model.vocab_size=1000 is smaller than the tokenizer's vocabulary"):
        resolve_model_config(config, 2000)


@pytest.mark.parametrize("model_vocab, tokenizer_vocab", [(50304, 50257), (151936, 151665), (2048, 2048)])
def test_a_model_vocabulary_padded_past_the_tokenizer_is_accepted_silently(model_vocab, tokenizer_vocab, caplog):
    config = default.get_config()
    config.model.vocab_size = model_vocab
    with caplog.at_level(logging.WARNING):
        assert resolve_model_config(config, tokenizer_vocab).vocab_size == model_vocab
    assert not caplog.records, caplog.text


def test_a_model_vocabulary_far_beyond_the_tokenizer_warns_with_both_sizes(caplog):
    config = default.get_config()
    config.model.vocab_size = 50257  # e.g. a GPT-2-sized model given the 8192-token BPE trained without data.tokenizer
    with caplog.at_level(logging.WARNING):
        resolve_model_config(config, 8192)
    assert [r.getMessage() for r in caplog.records] == [
        "config: model.vocab_size=50257 but the tokenizer has 8192 tokens: 42065 embedding rows (84%) are never "
        "used; set model.vocab_size=0 to size the model from the tokenizer, or a data.tokenizer of that size"]


def test_seq_len_beyond_the_model_context_is_refused():
    config = default.get_config()
    config.data.seq_len = 512
    with pytest.raises(ConfigError, match="data.seq_len=512 exceeds model.max_seq_len=256"):
        resolve_model_config(config, 2000)


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_is_six_per_matmul_weight_plus_attention(tie):
    config = ModelConfig(vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=128,
                         tie_embeddings=tie)
    leaves = jax.tree_util.tree_leaves_with_path(strip_boxes(abstract_params(config)))
    weights = sum(int(np.prod(x.shape)) for path, x in leaves if jax.tree_util.keystr(path).endswith("['scale']"))
    weights = sum(int(np.prod(x.shape)) for _, x in leaves) - weights  # every non-norm weight is a matmul weight
    if not tie:
        weights -= 256 * 64  # an untied input embedding is a lookup, not a matmul
    expected = 6 * weights + 12 * 3 * 4 * 16 * 100
    assert metrics.flops_per_token(config, 100) == expected


def test_mfu_is_achieved_over_peak_flops():
    assert metrics.mfu(tokens_per_second=1000, flops_per_token_=1e9, peak_flops_total=4e12) == pytest.approx(0.25)


def test_progress_without_bar_prints_messages_but_no_progress_lines():
    stream = io.StringIO()
    bar = metrics.Progress(total_steps=600, stream=stream, bar=False)
    bar.update(120, loss=3.21, tokens_per_second=12345, eta_seconds=130)
    bar.message("eval step 120: loss 3.0")
    assert stream.getvalue() == "eval step 120: loss 3.0\n"


def test_progress_line_shows_loss_rate_and_eta():
    stream = io.StringIO()
    bar = metrics.Progress(total_steps=600, stream=stream, width=10)
    bar.update(120, loss=3.21, tokens_per_second=12345, eta_seconds=130)
    assert stream.getvalue() == "step 120/600 [##--------] loss 3.2100 | 12.3k tok/s | ETA 2m10s\n"
