"""Parse a Hugging Face `config.json` (llama, mixtral, qwen2_moe) into one flat, validated config.

Only options the twin implements are accepted; anything that would change the maths of the reference
implementation but is not implemented here (biases, RoPE scaling, ...) is rejected with one clear error,
so a twin that loads a checkpoint always computes what transformers computes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "mixtral", "qwen2_moe")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh")


class ConfigError(ValueError):
    """A config.json the twin cannot represent exactly."""


@dataclass(frozen=True)
class TwinConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width (Mixtral: expert width)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    hidden_act: str
    # Per-layer attention window (None = full causal); key j visible to query i iff i - window < j <= i.
    layer_windows: tuple[int | None, ...]
    # Per-layer: True where the MLP is a sparse MoE block.
    moe_layers: tuple[bool, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0
    router_jitter_noise: float = 0.0


def _require(d: dict, key: str, model_type: str):
    if key not in d or d[key] is None:
        raise ConfigError(f"config.json ({model_type}) is missing required field {key!r}")
    return d[key]


def _rope_theta(d: dict) -> float:
    # transformers 5 writes rope_parameters={"rope_theta", "rope_type"}; 4.x writes rope_theta + rope_scaling.
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if params is not None:
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", d.get("rope_theta"))
    else:
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        theta = d.get("rope_theta", 10000.0)
    if rope_type != "default":
        raise ConfigError(f"unsupported rope_type {rope_type!r}: only 'default' RoPE is implemented")
    if theta is None:
        raise ConfigError("config.json has rope_parameters without 'rope_theta'")
    return float(theta)


def _reject_true(d: dict, keys: tuple[str, ...], model_type: str) -> None:
    for key in keys:
        if d.get(key):
            raise ConfigError(f"unsupported option {key}={d[key]!r} for {model_type}: the twin has no biases")


def _layer_windows(d: dict, model_type: str, n_layers: int) -> tuple[int | None, ...]:
    if model_type == "llama":
        if d.get("sliding_window"):
            raise ConfigError("llama has no sliding_window in transformers; use model_type 'mixtral' for windowed attention")
        return (None,) * n_layers
    if model_type == "mixtral":
        window = d.get("sliding_window")
        return (int(window) if window else None,) * n_layers
    # qwen2_moe: a window only where use_sliding_window and layer_types says so (transformers' rule).
    if not d.get("use_sliding_window", False):
        return (None,) * n_layers
    window = _require(d, "sliding_window", model_type)
    layer_types = d.get("layer_types")
    if layer_types is None:
        max_window_layers = d.get("max_window_layers", 28)
        layer_types = [
            "sliding_attention" if (i + 1) % 2 and i < max_window_layers else "full_attention" for i in range(n_layers)
        ]
    if len(layer_types) != n_layers:
        raise ConfigError(f"layer_types has {len(layer_types)} entries, expected num_hidden_layers={n_layers}")
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)


def config_from_dict(d: dict) -> TwinConfig:
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"unsupported model_type {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}")
    hidden = int(_require(d, "hidden_size", model_type))
    n_heads = int(_require(d, "num_attention_heads", model_type))
    n_kv = int(d.get("num_key_value_heads") or n_heads)
    n_layers = int(_require(d, "num_hidden_layers", model_type))
    head_dim = int(d.get("head_dim") or hidden // n_heads)
    if n_heads % n_kv:
        raise ConfigError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    act = d.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"unsupported hidden_act {act!r}; expected one of {SUPPORTED_ACTIVATIONS}")
    if d.get("attention_dropout"):
        raise ConfigError(f"unsupported attention_dropout={d['attention_dropout']}: the twin has no dropout")
    if model_type == "llama":
        _reject_true(d, ("attention_bias", "mlp_bias"), model_type)
        if d.get("pretraining_tp", 1) != 1:
            raise ConfigError(f"unsupported pretraining_tp={d['pretraining_tp']}: only 1 is implemented")
    if model_type == "qwen2_moe":
        # Qwen2MoeConfig defaults qkv_bias=True, so a missing field means biases are expected.
        if d.get("qkv_bias", True):
            raise ConfigError("unsupported qwen2_moe option qkv_bias=true (or missing): the twin has no biases")

    common = dict(
        model_type=model_type,
        vocab_size=int(_require(d, "vocab_size", model_type)),
        hidden_size=hidden,
        intermediate_size=int(_require(d, "intermediate_size", model_type)),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(d),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        hidden_act=act,
        layer_windows=_layer_windows(d, model_type, n_layers),
    )
    if model_type == "llama":
        return TwinConfig(**common, moe_layers=(False,) * n_layers)
    if model_type == "mixtral":
        n_experts = int(_require(d, "num_local_experts", model_type))
        return TwinConfig(
            **common,
            moe_layers=(True,) * n_layers,
            num_experts=n_experts,
            num_experts_per_tok=_top_k(d, n_experts, model_type),
            moe_intermediate_size=common["intermediate_size"],
            norm_topk_prob=True,
            router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
            router_jitter_noise=float(d.get("router_jitter_noise", 0.0)),
        )
    n_experts = int(_require(d, "num_experts", model_type))
    step = int(d.get("decoder_sparse_step", 1))
    mlp_only = set(d.get("mlp_only_layers") or [])
    if step < 1:
        raise ConfigError(f"decoder_sparse_step must be >= 1, got {step}")
    moe_layers = tuple(i not in mlp_only and n_experts > 0 and (i + 1) % step == 0 for i in range(n_layers))
    return TwinConfig(
        **common,
        moe_layers=moe_layers,
        num_experts=n_experts,
        num_experts_per_tok=_top_k(d, n_experts, model_type) if n_experts else 0,
        moe_intermediate_size=int(_require(d, "moe_intermediate_size", model_type)) if n_experts else 0,
        shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
    )


def _top_k(d: dict, n_experts: int, model_type: str) -> int:
    k = int(_require(d, "num_experts_per_tok", model_type))
    if not 1 <= k <= n_experts:
        raise ConfigError(f"num_experts_per_tok={k} must be in [1, {n_experts}]")
    return k


def load_config(model_dir: str | Path) -> TwinConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return config_from_dict(d)
