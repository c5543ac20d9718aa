"""Loading Hugging Face directories: single/sharded safetensors, every accepted expert layout, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from parity_tests.conftest import token_batch
from parity_tests.tolerances import assert_logits_close
from ultrathink_torch import CheckpointError, SafetensorsRequiredError, load_pretrained


def copy_config(reference, name, dst):
    _, src = reference(name)
    dst.mkdir(exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def saved_tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_logits(model, hf, what):
    ids = token_batch(2, 9)
    with torch.no_grad():
        assert_logits_close(model(ids).logits, hf(ids).logits, what)


def test_transformers5_save_pretrained_writes_per_expert_tensors(reference):
    """Documents the layout the loader must accept: v5 converts its fused experts back to v4 names on save."""
    names = set(saved_tensors(reference("mixtral_window")[1]))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    names = set(saved_tensors(reference("qwen2_moe_shared_mixed")[1]))
    assert "model.layers.0.mlp.experts.5.gate_proj.weight" in names
    assert "model.layers.0.mlp.shared_expert_gate.weight" in names
    assert not any("gate_up_proj" in n for n in names)


@pytest.mark.parametrize("name", ["mixtral_window", "qwen2_moe_shared_mixed"])
def test_fused_transformers5_expert_layout_loads(name, reference, tmp_path):
    hf, _ = reference(name)
    d = copy_config(reference, name, tmp_path / "fused")
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight" or not hf.config.tie_word_embeddings}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state), "expected transformers 5 fused experts in memory"
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert_same_logits(load_pretrained(d), hf, f"{name} from fused layout")


def test_sharded_checkpoint_loads(reference, tmp_path):
    hf, _ = reference("qwen2_moe_shared_mixed")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "test needs a multi-shard checkpoint"
    assert_same_logits(load_pretrained(tmp_path), hf, "sharded checkpoint")


def test_missing_shard_is_named(reference, tmp_path):
    hf, _ = reference("llama_gqa_head_dim")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shard.name} listed in model.safetensors.index.json is missing"):
        load_pretrained(tmp_path)


def test_pickle_only_directory_is_refused(reference, tmp_path):
    d = copy_config(reference, "llama_gqa_head_dim", tmp_path)
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(SafetensorsRequiredError, match=r"only pickle weights \(pytorch_model.bin\)"):
        load_pretrained(d)


def test_directory_without_weights_is_file_not_found(reference, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained(copy_config(reference, "llama_gqa_head_dim", tmp_path))


def test_missing_directory_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def rewrite(reference, name, tmp_path, edit):
    _, src = reference(name)
    d = copy_config(reference, name, tmp_path / "edited")
    state = saved_tensors(src)
    edit(state)
    save_file(state, str(d / "model.safetensors"))
    return d


def test_missing_tensor_is_named(reference, tmp_path):
    d = rewrite(reference, "mixtral_window", tmp_path, lambda s: s.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight$"):
        load_pretrained(d)


def test_unexpected_tensor_is_named(reference, tmp_path):
    d = rewrite(reference, "llama_gqa_head_dim", tmp_path, lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(48)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_pretrained(d)


def test_wrong_shape_is_named(reference, tmp_path):
    d = rewrite(reference, "llama_gqa_head_dim", tmp_path, lambda s: s.update({"model.norm.weight": torch.ones(31)}))
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight has shape \(31,\), expected \(32,\)"):
        load_pretrained(d)


def test_wrong_fused_expert_shape_is_named(reference, tmp_path):
    hf, _ = reference("mixtral_window")
    d = copy_config(reference, "mixtral_window", tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    state["model.layers.0.mlp.experts.down_proj"] = torch.zeros(4, 32, 23)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.down_proj has shape \(4, 32, 23\), expected \(4, 32, 24\)"):
        load_pretrained(d)


def test_tied_checkpoint_with_different_lm_head_is_refused(reference, tmp_path):
    d = rewrite(reference, "llama_tied_gelu", tmp_path, lambda s: s.update({"lm_head.weight": torch.zeros(97, 32)}))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_pretrained(d)


def test_loaded_parameters_are_trainable_in_requested_dtype(reference):
    model = load_pretrained(reference("qwen2_moe_shared_mixed")[1], dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    wrong = {n: p.dtype for n, p in params.items() if p.dtype != torch.bfloat16 or not p.requires_grad}
    assert not wrong, f"parameters not trainable bf16: {list(wrong)[:3]}"
    assert not any(p.is_meta for p in params.values())
