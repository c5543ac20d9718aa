"""Round trip from transformers: a checkpoint saved by transformers -> import -> export gives byte-identical tensors,
and layouts the model cannot represent are refused by name."""

from __future__ import annotations

import json
import warnings

import pytest
import transformers

from parity_tests.conftest import VOCAB, randomize_
from parity_tests.jax_models import safetensors_contents
from ultrathink_jax.hf import HFFormatError, export_params, load_hf

SUPPORTED = ["llama_gqa_head_dim", "llama_tied_gelu", "mixtral_window", "qwen2_moe_dense_window"]
# Qwen2-MoE with MoE every 2nd layer and a shared expert, the layout our MoE models export to.
QWEN2_MOE = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                 shared_expert_intermediate_size=24, norm_topk_prob=False, decoder_sparse_step=2, qkv_bias=False,
                 mlp_only_layers=[], tie_word_embeddings=False)


def qwen2_moe(**overrides):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(vocab_size=VOCAB, **QWEN2_MOE | overrides))
    randomize_(model)
    return model


def assert_byte_identical(original, exported):
    a, b = safetensors_contents(original), safetensors_contents(exported)
    assert a.keys() == b.keys(), f"tensor names differ: only in original {sorted(a.keys() - b.keys())[:3]}, " \
                                 f"only in export {sorted(b.keys() - a.keys())[:3]}"
    differ = [n for n in a if a[n] != b[n]]
    assert not differ, f"{len(differ)} tensors differ after import -> export, e.g. {differ[:3]}"


@pytest.mark.parametrize("name", SUPPORTED)
def test_import_then_export_reproduces_every_tensor_bytewise(name, reference, tmp_path):
    _, path = reference(name)
    config, params = load_hf(path)
    assert_byte_identical(path, export_params(params, config, tmp_path / "out"))


def test_qwen2_moe_with_shared_expert_round_trips_bytewise(tmp_path):
    model = qwen2_moe()
    model.save_pretrained(tmp_path / "hf")
    config, params = load_hf(tmp_path / "hf")
    assert (config.moe_every, config.moe_first_dense, config.shared_expert_d_ff) == (2, 0, 24)
    assert_byte_identical(tmp_path / "hf", export_params(params, config, tmp_path / "out"))


# the last: a zero-width shared expert, whose empty tensors and [1, D] gate both sides must count alike
@pytest.mark.parametrize("name", ["llama_tied_gelu", "mixtral_window", "qwen2_moe_no_shared_expert"])
def test_sharded_export_writes_the_index_transformers_writes(name, reference, tmp_path):
    model = qwen2_moe(shared_expert_intermediate_size=0) if name.startswith("qwen2") else reference(name)[0]
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    config, params = load_hf(tmp_path / "hf")
    export_params(params, config, tmp_path / "out", max_shard_bytes=20_000)
    theirs, ours = (json.loads((tmp_path / d / "model.safetensors.index.json").read_text()) for d in ("hf", "out"))
    assert len(set(ours["weight_map"].values())) > 1, "the model must span several shards"
    assert ours["metadata"] == theirs["metadata"]  # total_size and total_parameters
    assert ours["weight_map"].keys() == theirs["weight_map"].keys()


@pytest.mark.parametrize("name,message", [
    ("qwen2_moe_shared_mixed", "only leading dense layers"),  # MoE, dense, MoE
    ("qwen2_moe_step_window", "per-layer attention windows"),  # window on every other layer
])
def test_unrepresentable_layouts_are_refused_by_name(name, message, reference):
    with pytest.raises(HFFormatError, match=message):
        load_hf(reference(name)[1])
