"""LoRA (Hu et al. 2021): y = x W + (alpha / rank) * dropout(x) A B on chosen projections, W frozen.

Adapters live in their own tree that mirrors the model's: for a target projection at `.../self_attn/q_proj`, the
tree holds `.../self_attn/q_proj/{lora_a, lora_b}` with the scanned layer axis first, A [U, *in, r] and B [U, r, *out]
(in/out = the kernel's input/output axes, e.g. q_proj [D] -> [heads, head_dim]). B starts at zero, so training
starts from exactly the base model. The forward pass puts the adapters beside the kernels in the params given to
the unchanged model and a flax method interceptor adds the low-rank term to those projections' outputs (so the
model code knows nothing about LoRA). `merge` folds the adapters into the kernels for export;
`peft_adapter` writes them as a PEFT adapter directory instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ultrathink_jax.config import ConfigError, ModelConfig
from ultrathink_jax.layers.linear import Linear
from ultrathink_jax.tree import leaf_at

# projection name -> (parent module, kernel module, number of input axes of its kernel)
TARGETS = {"q": ("self_attn", "q_proj", 1), "k": ("self_attn", "k_proj", 1), "v": ("self_attn", "v_proj", 1),
           "o": ("self_attn", "o_proj", 2), "gate": ("mlp", "gate_proj", 1), "up": ("mlp", "up_proj", 1),
           "down": ("mlp", "down_proj", 1)}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        if self.rank <= 0:
            raise ConfigError(f"config: posttrain.lora_rank={self.rank} must be positive for LoRA")
        if self.alpha <= 0:
            raise ConfigError(f"config: posttrain.lora_alpha={self.alpha} must be positive")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"config: posttrain.lora_dropout={self.dropout} must be in [0, 1)")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ConfigError(f"config: posttrain.lora_targets={','.join(self.targets)!r}: unknown projection(s) "
                              f"{unknown}; choose from {','.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_text(cls, rank: int, alpha: float, dropout: float, targets: str) -> "LoraConfig":
        return cls(rank, alpha, dropout, tuple(t.strip() for t in targets.split(",") if t.strip()))


def _target_paths(params, lora: LoraConfig) -> list[tuple[tuple[str, ...], int]]:
    """(path of the kernel's module, n_in) for every targeted projection in the tree."""
    wanted = {(TARGETS[t][0], TARGETS[t][1]): TARGETS[t][2] for t in lora.targets}
    found = []

    def walk(node, path):
        if not isinstance(node, dict):
            return
        if len(path) >= 2 and tuple(path[-2:]) in wanted and "kernel" in node:
            found.append((tuple(path), wanted[tuple(path[-2:])]))
            return
        for k, v in node.items():
            walk(v, path + [k])

    walk(params, [])
    return found


def init_adapters(params, lora: LoraConfig, seed: int = 0):
    """A: PEFT's default (kaiming-uniform over the input fan-in); B: zeros. Raises if nothing is targeted (an
    MoE layer has no dense `mlp`, so gate/up/down target only dense layers)."""
    paths = _target_paths(params, lora)
    if not paths:
        raise ConfigError(f"config: posttrain.lora_targets={','.join(lora.targets)!r} matches no projection of "
                          "this model")
    key = jax.random.key(seed)
    out: dict = {}
    for i, (path, n_in) in enumerate(paths):
        kernel = leaf_at(params, path)["kernel"]  # [U, *in, *out]
        units, ins, outs = kernel.shape[0], kernel.shape[1:1 + n_in], kernel.shape[1 + n_in:]
        bound = 1.0 / np.sqrt(np.prod(ins))
        a = jax.random.uniform(jax.random.fold_in(key, i), (units, *ins, lora.rank), jnp.float32, -bound, bound)
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node["lora_a"], node["lora_b"] = a, jnp.zeros((units, lora.rank, *outs), jnp.float32)
    return out


def combine(base, adapters):
    """The model params with each adapter pair beside its kernel (what `apply` reads)."""
    if not isinstance(adapters, dict):
        return base
    return {k: combine(v, adapters[k]) if k in adapters else v for k, v in base.items()} | {
        k: v for k, v in adapters.items() if k not in base}


def interceptor(lora: LoraConfig, deterministic: bool):
    """Adds scale * dropout(x) A B to every Linear/Dense that finds `lora_a` beside its kernel."""
    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        m = context.module
        if (context.method_name != "__call__" or not isinstance(m, (Linear, nn.Dense))
                or not m.has_variable("params", "lora_a")):
            return out
        a, b = m.get_variable("params", "lora_a"), m.get_variable("params", "lora_b")
        x = args[0]
        if lora.dropout and not deterministic:
            keep = jax.random.bernoulli(m.make_rng("jitter"), 1.0 - lora.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
        n_in = a.ndim - 1
        dims = lambda nx: ((tuple(range(nx - n_in, nx)), tuple(range(n_in))), ((), ()))
        h = jax.lax.dot_general(x.astype(out.dtype), a.astype(out.dtype), dims(x.ndim))
        delta = jax.lax.dot_general(h, b.astype(out.dtype), ((( h.ndim - 1,), (0,)), ((), ())))
        return out + (lora.scale * delta).astype(out.dtype)

    return intercept


def apply(model, base, adapters, lora: LoraConfig | None, *args, deterministic: bool = True, rngs=None, **kwargs):
    """`model.apply` with adapters (None = the base model alone)."""
    if adapters is None or lora is None:
        return model.apply({"params": base}, *args, deterministic=deterministic, rngs=rngs, **kwargs)
    with nn.intercept_methods(interceptor(lora, deterministic)):
        return model.apply({"params": combine(base, adapters)}, *args, deterministic=deterministic, rngs=rngs,
                           **kwargs)


def delta(a, b, scale: float):
    """scale * A B per unit, shaped like the kernel [U, *in, *out]."""
    units, rank = a.shape[0], a.shape[-1]
    flat = jnp.einsum("uir,uro->uio", a.reshape(units, -1, rank), b.reshape(units, rank, -1))
    return scale * flat.reshape(a.shape[:-1] + b.shape[2:])


def merge(base, adapters, lora: LoraConfig):
    """Plain model params with W + scale * A B in every adapted kernel."""
    def walk(node, ad):
        if "lora_a" in ad:
            return {**node, "kernel": node["kernel"] + delta(ad["lora_a"], ad["lora_b"], lora.scale)}
        return {k: walk(v, ad[k]) if k in ad else v for k, v in node.items()}

    return walk(base, adapters)


def peft_adapter(adapters, lora: LoraConfig, model: ModelConfig, out_dir: str | os.PathLike,
                 base_model: str = "") -> Path:
    """Writes adapter_config.json + adapter_model.safetensors for `peft.PeftModel.from_pretrained`."""
    from safetensors.numpy import save_file

    from ultrathink_jax.hf.export import SAFETENSORS_METADATA
    from ultrathink_jax.hf.mapping import tensor_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, modules = {}, set()
    for entry in tensor_table(model):
        if entry.layout == "zeros" or entry.jax_path[-1] != "kernel":
            continue
        try:
            node = leaf_at(adapters, entry.jax_path[:-1])
        except KeyError:
            continue
        if "lora_a" not in node:
            continue
        a = np.asarray(jax.device_get(node["lora_a"][entry.index]), np.float32)  # [*in, r]
        b = np.asarray(jax.device_get(node["lora_b"][entry.index]), np.float32)  # [r, *out]
        name = entry.hf_name[:-len(".weight")]
        # HF weights are [out, in] with the kernel's in/out axes flattened in order: W_hf = B_hf A_hf
        tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, lora.rank).T)
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(lora.rank, -1).T)
        modules.add(f"{entry.jax_path[-3]}.{entry.jax_path[-2]}")  # our names are peft's (HF's) module names
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata=SAFETENSORS_METADATA)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True,
        # a regex over module names, so `mlp.gate_proj` never also matches an MoE shared expert's gate_proj
        "target_modules": r".*\.(" + "|".join(sorted(m.replace(".", r"\.") for m in modules)) + ")",
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
