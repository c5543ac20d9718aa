"""Config sections, presets and throughput accounting: defaults validate, bad values are named, FLOPs add up."""

import io

import jax
import numpy as np
import pytest

from configs import base, benchmark, default
from ultrathink_jax import metrics
from ultrathink_jax.config import ConfigError, ModelConfig
from ultrathink_jax.params import abstract_params
from ultrathink_jax.train.config import validate
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
    assert (o.learning_rate, o.weight_decay, o.warmup_steps, o.schedule, o.grad_clip) == \
        (3e-4, 0.1, 2000, "cosine", 1.0)
    assert (c.train.grad_accum, c.data.seq_len, c.model.vocab_size, c.model.rope_theta) == (4, 2048, 50257, 10000.0)


@pytest.mark.parametrize("key, value, message", [
    ("optim.schedule", "exponential", "optim.schedule='exponential' must be one of"),
    ("train.grad_accum", 3, "data.global_batch_size=16 must be divisible by train.grad_accum=3"),
    ("checkpoint.max_to_keep", 0, "checkpoint.max_to_keep=0 must be positive"),
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
