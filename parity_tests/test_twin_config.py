"""config.json parsing: accepted layouts, and one clear error for everything the twin cannot reproduce."""

from __future__ import annotations

import json

import pytest

from parity_tests.conftest import VARIANTS, build_reference
from ultrathink_torch import ConfigError, config_from_dict, load_config

LLAMA = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=1000.0)
QWEN = dict(LLAMA, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=4,
            qkv_bias=False, num_hidden_layers=4)


def test_head_dim_defaults_to_hidden_over_heads():
    assert config_from_dict(LLAMA).head_dim == 4


def test_rope_theta_from_transformers5_rope_parameters():
    cfg = config_from_dict(dict(LLAMA, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 77.0}))
    assert cfg.rope_theta == 77.0


def test_rope_theta_from_transformers4_field():
    assert config_from_dict(LLAMA).rope_theta == 1000.0


@pytest.mark.parametrize("scaling", [{"rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}},
                                     {"rope_scaling": {"type": "linear", "factor": 2.0}}])
def test_rope_scaling_is_rejected(scaling):
    with pytest.raises(ConfigError, match="unsupported rope_type"):
        config_from_dict(dict(LLAMA, **scaling))


@pytest.mark.parametrize("model_type", ["gpt2", None, "qwen3_moe"])
def test_unknown_model_type_is_rejected(model_type):
    with pytest.raises(ConfigError, match="unsupported model_type"):
        config_from_dict(dict(LLAMA, model_type=model_type))


@pytest.mark.parametrize("flag", ["attention_bias", "mlp_bias"])
def test_llama_biases_are_rejected(flag):
    with pytest.raises(ConfigError, match=f"unsupported option {flag}=True"):
        config_from_dict(dict(LLAMA, **{flag: True}))


def test_qwen2_moe_requires_explicit_qkv_bias_false():
    # Qwen2MoeConfig defaults qkv_bias to true, so a config without the field has biases the twin lacks.
    with pytest.raises(ConfigError, match="qkv_bias"):
        config_from_dict({k: v for k, v in QWEN.items() if k != "qkv_bias"})


def test_attention_dropout_is_rejected():
    with pytest.raises(ConfigError, match="unsupported attention_dropout=0.1"):
        config_from_dict(dict(LLAMA, attention_dropout=0.1))


def test_unsupported_activation_is_rejected():
    with pytest.raises(ConfigError, match="unsupported hidden_act 'relu'"):
        config_from_dict(dict(LLAMA, hidden_act="relu"))


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match="missing required field 'hidden_size'"):
        config_from_dict({k: v for k, v in LLAMA.items() if k != "hidden_size"})


def test_top_k_larger_than_expert_count_is_rejected():
    with pytest.raises(ConfigError, match=r"num_experts_per_tok=5 must be in \[1, 4\]"):
        config_from_dict(dict(QWEN, num_experts_per_tok=5))


def test_llama_sliding_window_is_rejected():
    with pytest.raises(ConfigError, match="llama has no sliding_window"):
        config_from_dict(dict(LLAMA, sliding_window=4))


def test_qwen2_moe_layout_from_mlp_only_layers_and_sparse_step():
    cfg = config_from_dict(dict(QWEN, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert cfg.moe_layers == (False, True, False, False), cfg.moe_layers


def test_qwen2_moe_window_only_when_use_sliding_window():
    assert config_from_dict(dict(QWEN, sliding_window=4)).layer_windows == (None,) * 4
    cfg = config_from_dict(dict(QWEN, sliding_window=4, use_sliding_window=True, max_window_layers=3))
    assert cfg.layer_windows == (4, None, 4, None), cfg.layer_windows  # transformers' layer_types rule


@pytest.mark.parametrize("name", list(VARIANTS))
def test_layer_layout_matches_transformers_modules(name):
    hf = build_reference(name)
    cfg = config_from_dict(hf.config.to_dict())
    hf_moe = tuple(hasattr(layer.mlp, "experts") for layer in hf.model.layers)
    assert cfg.moe_layers == hf_moe, f"twin MoE layers {cfg.moe_layers} vs transformers {hf_moe}"


def test_missing_config_json_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_config(tmp_path)


def test_malformed_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config(tmp_path)


def test_load_config_reads_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN))
    assert load_config(tmp_path).num_experts == 4
