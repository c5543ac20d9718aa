"""Hugging Face export / import: one mapping table, bitwise round trips, sharding, dtypes, files, bad input."""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conftest import required_module
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.hf import (ExportError, HFCheckpointNotFoundError, HFFormatError, export_params, family,
                               from_hf_config, load_hf, tensor_table, to_hf_config)
from ultrathink_jax.params import abstract_params

BASE = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
VARIANTS = {
    "llama": dict(BASE),
    "llama_tied_head_dim": dict(BASE, tie_embeddings=True, head_dim=12, activation="gelu"),
    "qwen2_moe_dense_window": dict(BASE, sliding_window=5),
    "mixtral": dict(BASE, n_experts=4, moe_d_ff=16, sliding_window=7, router_jitter=0.1),
    "qwen2_moe_shared_every_2": dict(BASE, n_layers=4, n_experts=4, moe_every=2, shared_expert_d_ff=24),
    "qwen2_moe_first_dense_no_shared": dict(BASE, n_layers=3, n_experts=3, n_experts_per_tok=1, moe_first_dense=1,
                                            norm_topk_prob=False, moe_d_ff=16),
}


def config(name: str) -> ModelConfig:
    return ModelConfig(**VARIANTS[name])


def random_params(cfg: ModelConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), nn.unbox(abstract_params(cfg)))


def trees_bitwise_equal(a, b) -> list[str]:
    """Paths of leaves that differ in shape or any bit."""
    flat_a = dict(jax.tree_util.tree_leaves_with_path(a))
    flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
    assert flat_a.keys() == flat_b.keys(), f"trees differ: {sorted(map(str, flat_a.keys() ^ flat_b.keys()))[:3]}"
    return [jax.tree_util.keystr(k) for k in flat_a
            if np.asarray(flat_a[k]).shape != np.asarray(flat_b[k]).shape
            or np.asarray(flat_a[k]).tobytes() != np.asarray(flat_b[k]).tobytes()]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_import_of_float32_export_is_bitwise_identical(name, tmp_path):
    cfg = config(name)
    params = random_params(cfg)
    export_params(params, cfg, tmp_path)
    cfg_back, params_back = load_hf(tmp_path)
    differing = trees_bitwise_equal(params, params_back)
    assert not differing, f"{name}: {len(differing)} leaves changed in the round trip, e.g. {differing[:3]}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_survives_translation_except_training_only_fields(name):
    cfg = config(name)
    back = from_hf_config(to_hf_config(cfg))
    expected = cfg
    if family(cfg) == "qwen2_moe":  # no router jitter there (a training-time noise, not part of the model)
        expected = dataclasses.replace(cfg, router_jitter=0.0)
    if family(cfg) == "mixtral":  # every layer is MoE: the dense d_ff is unused, the expert width is the one
        expected = dataclasses.replace(cfg, d_ff=cfg.resolved_moe_d_ff, moe_d_ff=0)
    assert back == expected, f"{name}: {back} != {expected}"


@pytest.mark.parametrize("name,expected", [
    ("llama", "llama"), ("llama_tied_head_dim", "llama"), ("qwen2_moe_dense_window", "qwen2_moe"),
    ("mixtral", "mixtral"), ("qwen2_moe_shared_every_2", "qwen2_moe"), ("qwen2_moe_first_dense_no_shared", "qwen2_moe"),
])
def test_family_follows_the_layer_layout(name, expected):
    assert family(config(name)) == expected


def test_mixtral_family_requires_renormalised_top_k():
    cfg = ModelConfig(**{**VARIANTS["mixtral"], "norm_topk_prob": False})
    assert family(cfg) == "qwen2_moe", "Mixtral always renormalises top-k: norm_topk_prob=False must be qwen2_moe"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_table_names_every_parameter_element_once(name):
    cfg = config(name)
    abstract = nn.unbox(abstract_params(cfg))
    covered: dict[tuple, int] = {}
    for entry in tensor_table(cfg):
        if entry.layout == "zeros":
            continue
        leaf = abstract
        for key in entry.jax_path:
            leaf = leaf[key]
        covered[entry.jax_path] = covered.get(entry.jax_path, 0) + int(np.prod(leaf.shape[len(entry.index):]))
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        key = tuple(p.key for p in path)
        assert covered.get(key) == int(np.prod(leaf.shape)), f"{key}: table covers {covered.get(key)} of {leaf.shape}"


def test_expert_tensors_use_per_expert_names(tmp_path):
    export_params(random_params(config("mixtral")), config("mixtral"), tmp_path / "m")
    export_params(random_params(config("qwen2_moe_shared_every_2")), config("qwen2_moe_shared_every_2"), tmp_path / "q")
    mixtral = set(load_file(tmp_path / "m" / "model.safetensors"))
    qwen = set(load_file(tmp_path / "q" / "model.safetensors"))
    assert {"model.layers.1.block_sparse_moe.experts.3.w1.weight", "model.layers.1.block_sparse_moe.experts.3.w2.weight",
            "model.layers.1.block_sparse_moe.experts.3.w3.weight", "model.layers.1.block_sparse_moe.gate.weight"} <= mixtral
    assert {"model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight",
            "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.shared_expert.up_proj.weight",
            "model.layers.1.mlp.shared_expert_gate.weight", "model.layers.0.mlp.up_proj.weight"} <= qwen


def test_q_and_o_projections_are_transposes_with_heads_flattened(tmp_path):
    cfg = config("llama_tied_head_dim")
    params = random_params(cfg)
    export_params(params, cfg, tmp_path)
    t = load_file(tmp_path / "model.safetensors")
    q = params["layers"]["block_0"]["self_attn"]["q_proj"]["kernel"][1]  # layer 1: [D, N, hd]
    o = params["layers"]["block_0"]["self_attn"]["o_proj"]["kernel"][1]  # [N, hd, D]
    # HF row n*hd + h of q_proj is head n, dim h
    assert np.array_equal(t["model.layers.1.self_attn.q_proj.weight"][2 * 12 + 5], q[:, 2, 5])
    assert np.array_equal(t["model.layers.1.self_attn.o_proj.weight"][:, 3 * 12 + 7], o[3, 7])
    assert "lm_head.weight" not in t, "a tied model has no lm_head.weight"


def test_sharded_export_writes_an_index_and_round_trips(tmp_path):
    cfg = config("qwen2_moe_shared_every_2")
    params = random_params(cfg)
    export_params(params, cfg, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors", files
    assert not (tmp_path / "model.safetensors").exists()
    contents = [load_file(tmp_path / f) for f in files]
    assert index["metadata"] == {"total_size": sum(t.nbytes for c in contents for t in c.values()),
                                 "total_parameters": sum(t.size for c in contents for t in c.values())}
    assert {n: f for f, c in zip(files, contents) for n in c} == index["weight_map"]
    sizes = [sum(t.nbytes for t in c.values()) for c in contents]
    assert all(s <= 40_000 for s in sizes), sizes
    assert not trees_bitwise_equal(params, load_hf(tmp_path)[1])


def test_export_names_a_parameter_missing_from_the_tree(tmp_path):
    cfg = config("llama")
    params = random_params(cfg)
    del params["norm"]
    with pytest.raises(ExportError, match="parameter norm/scale is missing from the parameter tree"):
        export_params(params, cfg, tmp_path)


def test_safetensors_files_carry_pt_format_metadata(tmp_path):
    export_params(random_params(config("llama")), config("llama"), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("dtype,np_dtype", [("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)])
def test_reduced_precision_export_rounds_each_weight(dtype, np_dtype, tmp_path):
    cfg = config("llama")
    params = random_params(cfg)
    export_params(params, cfg, tmp_path, dtype=dtype)
    t = load_file(tmp_path / "model.safetensors")
    emb = t["model.embed_tokens.weight"]
    assert emb.dtype == np_dtype
    assert np.array_equal(emb, params["embed_tokens"]["embedding"].astype(np_dtype))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == dtype
    _, back = load_hf(tmp_path)
    assert back["embed_tokens"]["embedding"].dtype == np.float32


def test_config_json_has_rope_theta_both_ways_and_no_qkv_bias(tmp_path):
    cfg = ModelConfig(**{**VARIANTS["qwen2_moe_shared_every_2"], "rope_theta": 1234.0})
    export_params(random_params(cfg), cfg, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_theta"] == 1234.0
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 1234.0}
    assert written["qkv_bias"] is False and written["architectures"] == ["Qwen2MoeForCausalLM"]
    assert (tmp_path / "generation_config.json").is_file()


def test_export_refuses_a_non_empty_directory_unless_overwrite(tmp_path):
    cfg, params = config("llama"), random_params(config("llama"))
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_params(params, cfg, tmp_path)
    export_params(params, cfg, tmp_path, overwrite=True)
    assert not (tmp_path / "old.txt").exists() and (tmp_path / "model.safetensors").is_file()


def test_export_rejects_an_unknown_dtype(tmp_path):
    with pytest.raises(ExportError, match="unknown dtype 'int8'"):
        export_params(random_params(config("llama")), config("llama"), tmp_path, dtype="int8")


def test_tokenizer_files_load_in_transformers_with_special_tokens(tmp_path):
    transformers = required_module("transformers")
    from ultrathink_jax.data import train_tokenizer

    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)
    export_params(random_params(config("llama")), config("llama"), tmp_path, tokenizer=tok)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "def g(y):\n    return y"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert (hf_tok.eos_token_id, hf_tok.bos_token_id, hf_tok.pad_token_id) == (tok.eos_id, tok.bos_id, tok.pad_id)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["eos_token_id"] == tok.eos_id


def test_import_accepts_the_fused_expert_layout(tmp_path):
    cfg = config("mixtral")
    params = random_params(cfg)
    export_params(params, cfg, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for layer in range(cfg.n_layers):
        pre = f"model.layers.{layer}.block_sparse_moe"
        w = lambda e, n: tensors.pop(f"{pre}.experts.{e}.{n}.weight")  # noqa: E731
        fused_gate_up = np.stack([np.concatenate([w(e, "w1"), w(e, "w3")]) for e in range(cfg.n_experts)])
        fused_down = np.stack([w(e, "w2") for e in range(cfg.n_experts)])
        tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = fused_gate_up
        tensors[f"model.layers.{layer}.mlp.experts.down_proj"] = fused_down
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = tensors.pop(f"{pre}.gate.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert not trees_bitwise_equal(params, load_hf(tmp_path)[1])


def _exported(tmp_path, name="llama"):
    export_params(random_params(config(name)), config(name), tmp_path)
    return tmp_path


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(model_type="gpt2"), "unsupported Hugging Face model_type 'gpt2'"),
    (lambda c: c.update(attention_bias=True), "attention_bias=true"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}), "rope_type 'yarn'"),
    (lambda c: c.pop("hidden_size"), "missing 'hidden_size'"),
])
def test_import_rejects_configs_the_model_cannot_represent(tmp_path, edit, message):
    d = _exported(tmp_path)
    written = json.loads((d / "config.json").read_text())
    edit(written)
    (d / "config.json").write_text(json.dumps(written))
    with pytest.raises(HFFormatError, match=message):
        load_hf(d)


def test_import_rejects_qwen2_moe_with_attention_biases():
    with pytest.raises(HFFormatError, match="qkv_bias"):
        from_hf_config({**to_hf_config(config("qwen2_moe_dense_window")), "qkv_bias": True})


def test_import_rejects_per_layer_windows():
    with pytest.raises(HFFormatError, match="per-layer attention windows"):
        from_hf_config({**to_hf_config(config("qwen2_moe_dense_window")),
                        "layer_types": ["sliding_attention", "full_attention"]})


def test_import_rejects_moe_layers_after_a_dense_gap():
    hf = {**to_hf_config(config("qwen2_moe_first_dense_no_shared")), "mlp_only_layers": [1]}
    with pytest.raises(HFFormatError, match="only leading dense layers"):
        from_hf_config(hf)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"), "missing tensor model.layers.1.self_attn.k_proj"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((3, 3), np.float32)}),
     r"model.layers.0.mlp.up_proj.weight has shape \(3, 3\), expected \(48, 32\)"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}),
     "unexpected tensor model.layers.0.self_attn.q_proj.bias"),
])
def test_import_rejects_tensors_that_do_not_fit(tmp_path, edit, message):
    d = _exported(tmp_path)
    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match=message):
        load_hf(d)


def test_import_refuses_pickle_only_checkpoints(tmp_path):
    d = _exported(tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(HFFormatError, match="only pickle weights"):
        load_hf(d)


def test_import_of_a_missing_directory_names_it(tmp_path):
    with pytest.raises(HFCheckpointNotFoundError, match="does not exist"):
        load_hf(tmp_path / "nope")
