"""Write params + ModelConfig + tokenizer as one GGUF file that llama.cpp runs (its `llama` architecture, which is
both Llama and Mixtral), with the `gguf` package (the format's own Python library).

Tensor names come from the Hugging Face table (hf/mapping.py) translated by gguf's own TensorNameMap, so there
is no second name table here. Three things differ from the safetensors export, all as llama.cpp's converter does:
  * q_proj / k_proj rows are permuted from Hugging Face's rotate-half order to llama.cpp's interleaved RoPE order;
  * a Mixtral layer's experts are stacked into one [E, ...] tensor per projection (ffn_{gate,up,down}_exps);
  * 1-D tensors (norm scales) and the router stay float32 whatever `dtype` is; q8_0 falls back to f16 for a
    tensor whose rows are not a multiple of 32 values.
The tokenizer is written as a gpt2-style byte-level BPE (vocabulary, merges, special tokens as CONTROL tokens,
padded with UNUSED entries up to the model's vocabulary) with pre-tokenizer `gpt-2`: llama.cpp then splits text
with exactly the GPT-2 regex that our tokenizers' ByteLevel(use_regex=True) pre-tokenizer uses.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ultrathink_jax.atomic import atomic_path
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.hf.export import ExportError, _expected_slice_shapes, hf_tensor
from ultrathink_jax.hf.mapping import family, tensor_table

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for the GPT-2 split regex (LLAMA_VOCAB_PRE_TYPE_GPT2)
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


class GGUFLayoutError(ExportError):
    """A model or tokenizer that llama.cpp cannot run as exported; the message says what to change."""


def gguf_refusal(config: ModelConfig) -> str | None:
    """Why llama.cpp cannot run `config` as a Llama / Mixtral GGUF (with what to change), or None."""
    fam = family(config)
    if fam == "qwen2_moe" and config.n_experts:
        reasons = []
        if config.moe_first_dense:
            reasons.append(f"moe_first_dense={config.moe_first_dense} (set moe_first_dense=0)")
        if config.moe_every != 1:
            reasons.append(f"moe_every={config.moe_every} (set moe_every=1)")
        if config.shared_expert_d_ff:
            reasons.append(f"shared_expert_d_ff={config.shared_expert_d_ff} (set shared_expert_d_ff=0)")
        if not config.norm_topk_prob:
            reasons.append("norm_topk_prob=False (set norm_topk_prob=True)")
        return ("llama.cpp runs MoE models with every layer MoE, no shared expert and renormalised top-k (Mixtral); "
                "this model has " + ", ".join(reasons))
    if config.sliding_window:
        return (f"sliding_window={config.sliding_window}: llama.cpp's llama architecture has no sliding-window "
                "attention (set sliding_window=0)")
    if config.activation != "silu":
        return f"activation={config.activation!r}: llama.cpp's llama architecture uses SwiGLU (set activation='silu')"
    if config.router_bias_update_rate:
        return ("aux-loss-free routing bias (router_bias_update_rate > 0): llama.cpp's Mixtral selects experts from "
                "the router probabilities alone, so the bias cannot be exported faithfully")
    return None


# ---------------------------------------------------------------------------------------------------- tokenizer

def _tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """tokens / types / merges / special ids of a byte-level BPE tokenizer, or GGUFLayoutError naming why not."""
    spec = json.loads(tokenizer.backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise GGUFLayoutError(f"tokenizer model {model.get('type')!r} is not BPE: only byte-level BPE exports to GGUF")
    if spec.get("normalizer") is not None:
        raise GGUFLayoutError("tokenizer has a normalizer, which llama.cpp's gpt2 tokenizer does not apply")
    if not (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")):
        raise GGUFLayoutError(f"tokenizer pre-tokenizer {json.dumps(pre, sort_keys=True)} is not GPT-2's "
                              "ByteLevel(add_prefix_space=False, use_regex=True), the only one exported")
    id_to_token = {i: t for t, i in model["vocab"].items()}
    special = {}
    for added in spec.get("added_tokens") or []:
        id_to_token[added["id"]] = added["content"]
        if added.get("special"):
            special[added["id"]] = added["content"]
    if max(id_to_token) >= vocab_size:
        raise GGUFLayoutError(f"tokenizer has id {max(id_to_token)} but the model's vocabulary is {vocab_size}")
    import gguf

    tokens, types = [], []
    for i in range(vocab_size):
        if i in id_to_token:
            tokens.append(id_to_token[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:  # the model's vocabulary is rounded up past the tokenizer's: never produced, never decoded
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"tokens": tokens, "types": types, "merges": merges}


# ------------------------------------------------------------------------------------------------------ tensors

def _permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face rotate-half rows [N*hd, D] -> llama.cpp's interleaved pairs (its converter's `permute`)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(params, config: ModelConfig):
    """Yields (gguf name, float32 numpy array in Hugging Face [out, in] layout) for every tensor of the file."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layers)
    shapes = _expected_slice_shapes(config)
    pending: dict[str, list[np.ndarray]] = {}  # merged expert name -> per-expert tensors so far
    for entry in tensor_table(config):
        t = hf_tensor(params, entry, shapes.__getitem__)
        hf_name = entry.hf_name
        if entry.hf_name.endswith("self_attn.q_proj.weight"):
            t = _permute_rope(t, config.n_heads)
        elif entry.hf_name.endswith("self_attn.k_proj.weight"):
            t = _permute_rope(t, config.n_kv_heads)
        m = _EXPERT.search(hf_name)
        if m:
            hf_name = _EXPERT.sub(".experts.", hf_name)  # the merged-experts name gguf maps
            pending.setdefault(hf_name, []).append(t)
            if len(pending[hf_name]) < config.n_experts:
                continue
            t = np.stack(pending.pop(hf_name))
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise GGUFLayoutError(f"no GGUF name for tensor {hf_name}")
        yield name, t


def _encode(name: str, t: np.ndarray, dtype: str):
    """(data, raw_dtype or None) as written for `dtype`."""
    import gguf

    if dtype == "f32" or t.ndim == 1 or ".ffn_gate_inp." in name:
        return t.astype(np.float32), None
    if dtype == "q8_0" and t.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if dtype == "bf16":
        return gguf.quants.quantize(t, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return t.astype(np.float16), None  # f16, and q8_0's fallback


# --------------------------------------------------------------------------------------------------------- file

def export_gguf(params, config: ModelConfig, tokenizer, out_file: str | os.PathLike, dtype: str = "f32",
                name: str = "ultrathink", overwrite: bool = False) -> Path:
    """Writes `out_file` (GGUF v3, llama architecture). Raises GGUFLayoutError for what llama.cpp cannot run."""
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"unknown GGUF dtype {dtype!r}; expected one of {', '.join(GGUF_DTYPES)}")
    out = Path(out_file)
    if out.is_dir():
        raise ExportError(f"output path {out} is a directory; give a file name such as model.gguf")
    if out.exists() and not overwrite:
        raise ExportError(f"output file {out} exists (pass --overwrite to replace it)")
    reason = gguf_refusal(config)
    if reason:
        raise GGUFLayoutError(f"llama.cpp cannot run this model: {reason}")
    if tokenizer is None:
        raise GGUFLayoutError("a GGUF file needs the model's tokenizer (none was found)")
    tok = _tokenizer_fields(tokenizer, config.vocab_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # never leaves a half-written file under the requested name
        _write_gguf(str(tmp), params, config, tokenizer, tok, dtype, name)
    return out


def _write_gguf(path: str, params, config: ModelConfig, tokenizer, tok: dict, dtype: str, name: str) -> None:
    import gguf

    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    cfg = config
    w.add_name(name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.resolved_moe_d_ff if cfg.n_experts else cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.resolved_head_dim)
    w.add_value_length(cfg.resolved_head_dim)
    w.add_rope_dimension_count(cfg.resolved_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.n_experts:
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.n_experts_per_tok)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(GGUF_PRE_TOKENIZER)
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(False)  # our tokenizer adds no special tokens: prompts are encoded as-is
    w.add_add_eos_token(False)
    for tensor_name, t in gguf_tensors(params, config):
        data, raw_dtype = _encode(tensor_name, t, dtype)
        w.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def export_gguf_from_run(workdir, out_file, step: int | None = None, dtype: str = "f32",
                         overwrite: bool = False) -> Path:
    from ultrathink_jax.train import load_run

    _check_out(out_file, overwrite)
    run = load_run(workdir, step)
    return export_gguf(run.params, run.model_config, run.tokenizer, out_file, dtype, Path(workdir).name, overwrite)


def export_gguf_from_hf(hf_dir, out_file, dtype: str = "f32", overwrite: bool = False) -> Path:
    from ultrathink_jax.data import load_tokenizer
    from ultrathink_jax.hf.load import HFCheckpointNotFoundError, load_hf

    _check_out(out_file, overwrite)
    config, params = load_hf(hf_dir)
    if not (Path(hf_dir) / "tokenizer.json").is_file() and not (Path(hf_dir) / "vocab.json").is_file():
        raise HFCheckpointNotFoundError(f"no tokenizer.json in {hf_dir}: a GGUF file needs the model's tokenizer")
    return export_gguf(params, config, load_tokenizer(hf_dir), out_file, dtype, Path(hf_dir).name, overwrite)


def _check_out(out_file, overwrite: bool) -> None:  # fail before restoring anything
    if Path(out_file).exists() and not overwrite:
        raise ExportError(f"output file {out_file} exists (pass --overwrite to replace it)")
