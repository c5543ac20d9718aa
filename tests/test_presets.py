"""Size presets match the original's promised sizes, counted from abstract shapes (nothing is allocated)."""

import importlib

import pytest

from ultrathink_jax.config import ModelConfig
from ultrathink_jax.params import param_count

NOMINAL = {"tiny": 125e6, "small": 350e6, "medium": 760e6, "large": 1.3e9, "xl": 2.7e9}


@pytest.mark.parametrize("name", sorted(NOMINAL))
def test_preset_parameter_count_is_within_5_percent_of_nominal(name):
    config = importlib.import_module(f"ultrathink_jax.configs.{name}").get_config()
    model = ModelConfig.from_mapping(config.model)
    count = param_count(model)
    assert abs(count / NOMINAL[name] - 1) <= 0.05, f"{name}: {count / 1e6:.1f}M vs nominal {NOMINAL[name] / 1e6:.0f}M"
    assert model.vocab_size == 50257 and model.max_seq_len == 2048


def test_default_preset_is_small_enough_for_a_cpu():
    config = importlib.import_module("ultrathink_jax.configs.default").get_config()
    assert config.model.vocab_size == 0, "the default takes its vocabulary from the tokenizer it trains"
    model = ModelConfig.from_mapping({**config.model, "vocab_size": config.data.vocab_size})
    assert param_count(model) < 20e6
