"""Load a Hugging Face-format directory (config.json + safetensors, single file or sharded) into the twin.

Accepted MoE expert layouts (what transformers 4.x and 5.x write or load):
  - per-expert, Qwen2-MoE / v5 save_pretrained: `mlp.experts.{e}.{gate,up,down}_proj.weight`, router `mlp.gate.weight`
  - per-expert, Mixtral:                        `block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`, `block_sparse_moe.gate.weight`
  - fused, transformers 5 in-memory layout:     `mlp.experts.gate_up_proj` (E, 2*I, H; gate rows first), `mlp.experts.down_proj` (E, H, I)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from .config import TwinConfig, load_config
from .model import CausalLM

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class CheckpointError(ValueError):
    """Tensors in a checkpoint that do not match the twin built from its config.json."""


class SafetensorsRequiredError(CheckpointError):
    """The directory only holds pickle-based weights, which the twin refuses to unpickle."""


def safetensors_files(model_dir: Path) -> list[Path]:
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a safetensors index with a 'weight_map': {e}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"shard {f.name} listed in {index.name} is missing from {model_dir}")
        return files
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise SafetensorsRequiredError(
            f"{model_dir} has only pickle weights ({', '.join(pickles)}); save with safe_serialization=True "
            "(model.safetensors) — the twin never unpickles weights"
        )
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in tensors:
                    raise CheckpointError(f"tensor {name} appears in more than one shard (again in {path.name})")
                tensors[name] = f.get_tensor(name)
    return tensors


def to_twin_names(tensors: Mapping[str, torch.Tensor], cfg: TwinConfig) -> dict[str, torch.Tensor]:
    """Rename/split checkpoint tensors (any accepted layout) into the twin's parameter names.

    Also used on transformers' in-memory parameters/gradients, which use the fused v5 layout.
    """
    out: dict[str, torch.Tensor] = {}
    I = cfg.moe_intermediate_size
    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # derived buffer some old checkpoints carry
            continue
        name = re.sub(r"\.block_sparse_moe\.", ".mlp.", name)
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(w[123])\.weight", name)
        if m:
            name = f"{m[1]}.{m[2]}.{_MIXTRAL_EXPERT[m[3]]}.weight"
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)", name)
        if m:
            expected = (cfg.num_experts, 2 * I, cfg.hidden_size) if m[2] == "gate_up_proj" else (
                cfg.num_experts, cfg.hidden_size, I)
            if tuple(t.shape) != expected:
                raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, expected {expected}")
            for e in range(cfg.num_experts):
                if m[2] == "gate_up_proj":
                    out[f"{m[1]}.{e}.gate_proj.weight"] = t[e, :I]
                    out[f"{m[1]}.{e}.up_proj.weight"] = t[e, I:]
                else:
                    out[f"{m[1]}.{e}.down_proj.weight"] = t[e]
            continue
        if cfg.shared_expert_intermediate_size == 0 and re.search(r"\.mlp\.shared_expert(_gate)?\.", name):
            # transformers builds a zero-width shared expert when its size is 0: it contributes exactly 0.
            if "shared_expert_gate" in name or t.numel() == 0:
                continue
        if name in out:
            raise CheckpointError(f"tensor {name} is given twice (in two layouts)")
        out[name] = t
    if cfg.tie_word_embeddings and "lm_head.weight" in out:
        lm_head = out.pop("lm_head.weight")
        embed = out.get("model.embed_tokens.weight")
        if embed is not None and not torch.equal(lm_head, embed):
            raise CheckpointError("lm_head.weight differs from model.embed_tokens.weight but tie_word_embeddings=true")
    return out


def check_state(state: Mapping[str, torch.Tensor], model: CausalLM) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"unexpected tensor {unexpected[0]}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(state[name].shape)}, expected {shape}")


def load_pretrained(model_dir: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> CausalLM:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    cfg = load_config(model_dir)
    state = to_twin_names(read_safetensors(safetensors_files(model_dir)), cfg)
    with torch.device("meta"):
        model = CausalLM(cfg)
    check_state(state, model)
    state = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
