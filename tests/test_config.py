"""ModelConfig refuses impossible values at construction, naming the field and the value."""

import pytest

from ultrathink_jax.config import ConfigError, ModelConfig


@pytest.mark.parametrize("overrides,message", [
    (dict(n_heads=6, n_kv_heads=4), r"n_heads=6 must be divisible by n_kv_heads=4"),
    (dict(head_dim=15), r"head_dim=15 must be even"),
    (dict(d_model=0), r"d_model=0 must be positive"),
    (dict(n_layers=-1), r"n_layers=-1 must be positive"),
    (dict(activation="relu6"), r"activation='relu6' must be one of"),
    (dict(remat_policy="sometimes"), r"remat_policy='sometimes' must be one of"),
    (dict(dtype="float64"), r"dtype='float64' must be one of"),
    (dict(d_model=100, n_heads=12, n_kv_heads=12), r"d_model=100 must be divisible by n_heads=12"),
    (dict(n_experts=4, n_experts_per_tok=5), r"n_experts_per_tok=5 must be in \[1, n_experts=4\]"),
    (dict(n_experts=4, moe_dispatch="random"), r"moe_dispatch='random' must be one of"),
    (dict(n_experts=4, n_layers=2, moe_every=4), r"select no MoE layer"),
    (dict(sliding_window=-2), r"sliding_window=-2 must be >= 0"),
    (dict(scan_unroll=-1), r"scan_unroll=-1 must be >= 0"),
])
def test_impossible_values_fail_with_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        ModelConfig(**overrides)
    assert "\n" not in str(err.value)


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['n_layer'\]"):
        ModelConfig.from_mapping({"n_layer": 3})


def test_head_dim_defaults_to_d_model_over_heads_and_may_be_explicit():
    assert ModelConfig(d_model=768, n_heads=12).resolved_head_dim == 64
    assert ModelConfig(d_model=768, n_heads=12, head_dim=32).resolved_head_dim == 32


def test_moe_layer_selection_follows_qwen2_moe_semantics():
    every_second = ModelConfig(n_layers=6, n_experts=4, moe_every=2)
    assert [every_second.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]
    after_two = ModelConfig(n_layers=4, n_experts=4, moe_first_dense=2)
    assert [after_two.is_moe_layer(i) for i in range(4)] == [False, False, True, True]
