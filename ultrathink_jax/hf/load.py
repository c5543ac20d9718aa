"""Read a Hugging Face llama / mixtral / qwen2_moe directory into (ModelConfig, float32 numpy params).

Uses the same table as export, so load(export(params)) == params bitwise for a float32 export. Accepted expert
layouts: per-expert names (Mixtral `block_sparse_moe.experts.{e}.w1/w2/w3`, Qwen2-MoE `mlp.experts.{e}.*_proj`,
either naming for either family) and transformers 5's fused `mlp.experts.gate_up_proj` / `down_proj`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from safetensors import safe_open

from ultrathink_jax.config import ModelConfig
from ultrathink_jax.errors import one_line
from ultrathink_jax.hf.mapping import MIXTRAL_EXPERT_NAMES, HFFormatError, family, from_hf_config, tensor_table
from ultrathink_jax.tree import leaf_at

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TO_QWEN = {v: k for k, v in MIXTRAL_EXPERT_NAMES.items()}


class HFCheckpointNotFoundError(FileNotFoundError, HFFormatError):
    pass


def read_config(hf_dir: str | os.PathLike) -> dict:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise HFCheckpointNotFoundError(f"Hugging Face model directory does not exist: {hf_dir}")
    if not path.is_file():
        raise HFCheckpointNotFoundError(f"no config.json in {hf_dir}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{path} is not valid JSON: {e}") from None


def safetensors_files(hf_dir: Path) -> list[Path]:
    index, single = hf_dir / "model.safetensors.index.json", hf_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFFormatError(f"{index} is not a safetensors index with a 'weight_map' ({e})") from None
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise HFCheckpointNotFoundError(f"shard {missing[0]} listed in {index.name} is missing from {hf_dir}")
        return files
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise HFFormatError(f"{hf_dir} holds only pickle weights ({', '.join(pickles)}); weights are read from "
                            "safetensors only (re-save with safe_serialization=True)")
    raise HFCheckpointNotFoundError(f"no model.safetensors or model.safetensors.index.json in {hf_dir}")


def read_tensors(files: list[Path]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="np") as f:
                for name in f.keys():
                    if name in tensors:
                        raise HFFormatError(f"tensor {name} appears in more than one shard (again in {path.name})")
                    tensors[name] = f.get_tensor(name)
        except (HFFormatError, MemoryError):
            raise
        except Exception as e:  # SafetensorError: a bad header, sizes that do not add up, not safetensors at all
            raise HFFormatError(f"{path} is not a readable safetensors file: {one_line(e)}") from None
        for name, t in tensors.items():
            if t.dtype.kind in "biuSU":  # bools, integers, bytes (bfloat16 is kind "V")
                raise HFFormatError(f"tensor {name} in {path.name} has dtype {t.dtype}, expected a float type")
    return tensors


def canonical_names(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """Renames every accepted layout to the table's names (those export writes); drops derived buffers."""
    mixtral = family(config) == "mixtral"
    out: dict[str, np.ndarray] = {}

    def put(name, t):
        if name in out:
            raise HFFormatError(f"tensor {name} is given twice (in two layouts)")
        out[name] = t

    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.(.+)", name)
        if not m:
            put(name, t)
            continue
        layer, rest = m[1], m[2]
        fused = re.fullmatch(r"experts\.(gate_up_proj|down_proj)", rest)
        if fused:
            for e, (proj, part) in enumerate(_split_fused(name, fused[1], t, config)):
                for p, x in zip(proj, part):
                    put(_moe_name(layer, f"experts.{e}.{p}.weight", mixtral), x)
            continue
        expert = re.fullmatch(r"experts\.(\d+)\.(\w+)\.weight", rest)
        if expert:
            proj = _TO_QWEN.get(expert[2], expert[2])
            put(_moe_name(layer, f"experts.{expert[1]}.{proj}.weight", mixtral), t)
        elif rest == "gate.weight":
            put(_moe_name(layer, rest, mixtral), t)
        else:
            put(f"model.layers.{layer}.mlp.{rest}", t)
    return out


def _moe_name(layer: str, rest: str, mixtral: bool) -> str:
    if not mixtral:
        return f"model.layers.{layer}.mlp.{rest}"
    m = re.fullmatch(r"experts\.(\d+)\.(\w+)\.weight", rest)
    if m:
        rest = f"experts.{m[1]}.{MIXTRAL_EXPERT_NAMES[m[2]]}.weight"
    return f"model.layers.{layer}.block_sparse_moe.{rest}"


def _split_fused(name: str, kind: str, t: np.ndarray, config: ModelConfig):
    """transformers 5's fused experts: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F]."""
    E, D, F = config.n_experts, config.d_model, config.resolved_moe_d_ff
    expected = (E, 2 * F, D) if kind == "gate_up_proj" else (E, D, F)
    if tuple(t.shape) != expected:
        raise HFFormatError(f"tensor {name} has shape {tuple(t.shape)}, expected {expected}")
    if kind == "gate_up_proj":
        return [(("gate_proj", "up_proj"), (t[e, :F], t[e, F:])) for e in range(E)]
    return [(("down_proj",), (t[e],)) for e in range(E)]


def load_hf(hf_dir: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(config, params): params is the model's parameter tree as float32 numpy arrays."""
    hf_dir = Path(hf_dir)
    config = from_hf_config(read_config(hf_dir))
    tensors = canonical_names(read_tensors(safetensors_files(hf_dir)), config)
    return config, params_from_tensors(tensors, config)


def params_from_tensors(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict:
    from flax import linen as nn

    from ultrathink_jax.params import abstract_params

    import jax

    tensors = dict(tensors)
    abstract = nn.unbox(abstract_params(config))
    params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), abstract)
    filled = {}
    for entry in tensor_table(config):
        t = tensors.pop(entry.hf_name, None)
        if entry.layout == "zeros":  # inert (zero-width shared expert): nothing to read
            continue
        if t is None:
            raise HFFormatError(f"checkpoint is missing tensor {entry.hf_name}")
        leaf = leaf_at(params, entry.jax_path)
        jax_shape = leaf.shape[len(entry.index):]
        if tuple(t.shape) != entry.hf_shape(jax_shape):
            raise HFFormatError(f"tensor {entry.hf_name} has shape {tuple(t.shape)}, "
                                f"expected {entry.hf_shape(jax_shape)}")
        leaf[entry.index] = entry.from_hf(np.asarray(t, np.float32), jax_shape)
        filled[entry.jax_path] = filled.get(entry.jax_path, 0) + int(np.prod(jax_shape))
    if config.tie_embeddings and "lm_head.weight" in tensors:
        lm_head = tensors.pop("lm_head.weight")
        if not np.array_equal(np.asarray(lm_head, np.float32), params["embed_tokens"]["embedding"]):
            raise HFFormatError("lm_head.weight differs from model.embed_tokens.weight but tie_word_embeddings=true")
    if tensors:
        extra = sorted(tensors)
        raise HFFormatError(f"unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                            + f" for a {family(config)} model with this config.json")
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        key = tuple(p.key for p in path)
        if filled.get(key, 0) != leaf.size:  # guards the table: every parameter element read exactly once
            raise AssertionError(f"mapping table covers {filled.get(key, 0)} of {leaf.size} elements of {key}")
    return params
