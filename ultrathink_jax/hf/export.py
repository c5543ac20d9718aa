"""Write params + ModelConfig as a Hugging Face model directory. numpy + safetensors only (no torch, no transformers).

The directory holds `config.json`, `generation_config.json`, safetensors weights (one `model.safetensors`, or
`model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` above `max_shard_bytes`), and, when
a tokenizer is given, `tokenizer.json` + `tokenizer_config.json` (PreTrainedTokenizerFast with bos/eos/pad).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors.numpy import save_file

from ultrathink_jax.config import ModelConfig
from ultrathink_jax.hf.mapping import (HFCompatibilityWarning, TensorMap, tensor_table, to_hf_config,
                                       transformers4_limitations)
from ultrathink_jax.tree import leaf_at

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# huggingface_hub's default shard size ("5GB", decimal); transformers 5's save_pretrained defaults to 50GB.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


class ExportError(ValueError):
    """Bad export arguments (dtype, output directory, parameter tree); the message names the problem."""


def hf_tensor(params, entry: TensorMap, jax_shape_of) -> np.ndarray:
    """The float32 Hugging Face tensor of one table entry (only that slice is copied off the devices)."""
    if entry.layout == "zeros":
        return np.zeros(entry.zeros_shape, np.float32)
    try:
        leaf = leaf_at(params, entry.jax_path)
    except KeyError:
        raise ExportError(f"parameter {'/'.join(entry.jax_path)} is missing from the parameter tree") from None
    part = leaf[entry.index] if entry.index else leaf
    host = np.asarray(jax.device_get(part), dtype=np.float32)
    if host.shape != jax_shape_of(entry):
        raise ExportError(f"parameter {'/'.join(entry.jax_path)}{list(entry.index)} has shape {host.shape}, "
                          f"expected {jax_shape_of(entry)} for {entry.hf_name}")
    return entry.to_hf(host)


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def export_params(params, config: ModelConfig, out_dir: str | os.PathLike, dtype: str = "float32",
                  tokenizer=None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Writes the Hugging Face directory for `params` (plain float32 tree, device or numpy arrays). `tokenizer` is an
    `ultrathink_jax.data.Tokenizer` or None (no tokenizer files). Returns the directory. Warns
    (HFCompatibilityWarning, one line each) when transformers 4.x will not be able to load the directory."""
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if max_shard_bytes <= 0:
        raise ExportError(f"max_shard_bytes={max_shard_bytes} must be positive")
    if config.router_bias_update_rate:
        # Refused, not dropped: without its bias the exported router would choose other experts than training did.
        raise ExportError("this model routes with an aux-loss-free selection bias (router_bias_update_rate > 0), "
                          "which transformers' Mixtral / Qwen2-MoE cannot express; train with "
                          "router_bias_update_rate=0 to hand it off")
    out = prepare_out_dir(out_dir, overwrite)
    table = tensor_table(config)
    shapes = _expected_slice_shapes(config)
    np_dtype = DTYPES[dtype]
    entries = {e.hf_name: e for e in table}
    elements = {e.hf_name: int(np.prod(e.hf_shape(shapes[e]))) for e in table}

    # Split by size alone, as transformers' save_pretrained does (same splitter, names and index); each shard's
    # tensors are then copied off the devices only while that shard is written.
    split = split_state_dict_into_shards_factory(
        elements, get_storage_size=lambda n: n * np.dtype(np_dtype).itemsize,
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_bytes)
    for name, hf_names in split.filename_to_tensors.items():
        tensors = {t: hf_tensor(params, entries[t], shapes.__getitem__).astype(np_dtype) for t in hf_names}
        save_file(tensors, str(out / name), metadata=SAFETENSORS_METADATA)
    if split.is_sharded:
        index = {"metadata": {"total_parameters": sum(elements.values()), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        _write_json(out / "model.safetensors.index.json", index)

    special = _special_token_ids(tokenizer)
    _write_json(out / "config.json", to_hf_config(config, dtype, **special))
    _write_json(out / "generation_config.json", {"_from_model_config": True, **special})
    if tokenizer is not None:
        tokenizer.save(out)
    for limitation in transformers4_limitations(config):
        warnings.warn(limitation, HFCompatibilityWarning, stacklevel=2)
    return out


def _expected_slice_shapes(config: ModelConfig) -> dict[TensorMap, tuple[int, ...]]:
    """JAX-side shape of each entry's slice, from the abstract parameter tree (nothing allocated)."""
    from flax import linen as nn

    from ultrathink_jax.params import abstract_params

    abstract = nn.unbox(abstract_params(config))
    shapes = {}
    for entry in tensor_table(config):
        if entry.layout == "zeros":
            shapes[entry] = ()
            continue
        shapes[entry] = tuple(leaf_at(abstract, entry.jax_path).shape[len(entry.index):])
    return shapes


def _special_token_ids(tokenizer) -> dict[str, Any]:
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
