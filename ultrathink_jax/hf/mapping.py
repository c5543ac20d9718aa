"""The one correspondence between our parameters / ModelConfig and Hugging Face checkpoints, used by export AND import.

Families: a dense model is `llama`; MoE in every layer, no shared expert, renormalised top-k is `mixtral`; anything
else (leading dense layers, MoE every k-th layer, a shared expert, `norm_topk_prob=False`, or a dense model with a
sliding window, which llama cannot express) is `qwen2_moe`.

Every tensor maps by a transpose/reshape only (the model uses Hugging Face's rotate-half RoPE, so no permutation).
Names are Hugging Face's except where Flax's differ by convention (`kernel`/`scale`/`embedding` for `weight`) and
the MoE block (`moe/router`, stacked `wi_*`/`wo`: one [E, ...] tensor per kind, which HF splits per expert):
  embed_tokens/embedding [V, D]            model.embed_tokens.weight [V, D]
  self_attn/q_proj/kernel [D, N, hd]       self_attn.q_proj.weight [N*hd, D]      (k_proj, v_proj alike)
  self_attn/o_proj/kernel [N, hd, D]       self_attn.o_proj.weight [D, N*hd]
  mlp/{gate,up}_proj/kernel [D, F]         mlp.{gate,up}_proj.weight [F, D]        down_proj [F, D] -> [D, F]
  moe/router/kernel [D, E]                 mlp.gate.weight / block_sparse_moe.gate.weight [E, D]
  moe/wi_gate, wi_up [E, D, F]; wo [E, F, D]  per expert e: gate_proj/w1, up_proj/w3 [F, D]; down_proj/w2 [D, F]
  moe/shared_expert/*, shared_expert_gate  mlp.shared_expert.*, mlp.shared_expert_gate.weight [1, D]
  {input,post_attention}_layernorm/scale   the same names' .weight [D]; norm/scale is model.norm.weight
  lm_head/kernel [D, V]                    lm_head.weight [V, D] (absent when tied)
Expert tensors use the per-expert names that transformers 4.x loads and 5.x both writes and loads.

Checked to load exactly (no missing/unexpected tensors, logits within tolerance) in transformers 4.57.6 and 5.x
(parity_tests/test_hf4_compat.py). The one layout 4.x cannot load is a qwen2_moe export whose head_dim is not
d_model / n_heads: 4.x's Qwen2MoeAttention refuses it, so export warns (`transformers4_limitations`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from ultrathink_jax.config import ConfigError, ModelConfig
from ultrathink_jax.model import layer_plan

FAMILIES = ("llama", "mixtral", "qwen2_moe")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
# Mixtral names its expert projections w1/w3/w2 where Llama and Qwen2-MoE say gate_proj/up_proj/down_proj.
MIXTRAL_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


class HFFormatError(ValueError):
    """A Hugging Face checkpoint or config our model cannot represent exactly; the message names the field/tensor."""


class HFCompatibilityWarning(UserWarning):
    """An export that transformers 5.x loads exactly but some supported older transformers cannot load."""


def family(config: ModelConfig) -> str:
    if not config.n_experts:
        return "qwen2_moe" if config.sliding_window else "llama"
    mixtral_like = (config.moe_first_dense == 0 and config.moe_every == 1 and not config.shared_expert_d_ff
                    and config.norm_topk_prob)
    return "mixtral" if mixtral_like else "qwen2_moe"


def transformers4_limitations(config: ModelConfig) -> list[str]:
    """Why transformers 4.x (checked: 4.57.6) cannot load `config`'s export; [] when it can."""
    head_dim, implied = config.resolved_head_dim, config.d_model // config.n_heads
    if family(config) == "qwen2_moe" and head_dim * config.n_heads != config.d_model:
        # 4.x Qwen2MoeAttention raises "hidden_size must be divisible by num_heads" unless head_dim * heads ==
        # hidden_size; llama and mixtral honour an explicit head_dim in 4.x.
        return [f"qwen2_moe export with head_dim={head_dim} != d_model/n_heads={implied}: transformers 5.x loads it, "
                "transformers 4.x refuses it (its Qwen2MoeAttention requires head_dim * n_heads == hidden_size)"]
    return []


# ---------------------------------------------------------------------------------------------------------- config

def to_hf_config(config: ModelConfig, dtype: str = "float32", bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict[str, Any]:
    """config.json contents that transformers 4.x and 5.x both read (RoPE as `rope_theta` AND `rope_parameters`,
    dtype as `torch_dtype` AND `dtype`)."""
    fam = family(config)
    cfg = config
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[fam]],
        "model_type": fam,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.resolved_moe_d_ff if fam == "mixtral" else cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": cfg.activation,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if fam == "llama":
        d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif fam == "mixtral":
        d.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_tok,
                 sliding_window=cfg.sliding_window or None, router_aux_loss_coef=cfg.router_aux_loss_weight,
                 router_jitter_noise=cfg.router_jitter, output_router_logits=False)
    else:
        window = bool(cfg.sliding_window)
        d.update(
            num_experts=cfg.n_experts,
            num_experts_per_tok=cfg.n_experts_per_tok if cfg.n_experts else 1,
            moe_intermediate_size=cfg.resolved_moe_d_ff if cfg.n_experts else cfg.d_ff,
            shared_expert_intermediate_size=cfg.shared_expert_d_ff,
            norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=cfg.moe_every,
            mlp_only_layers=list(range(cfg.moe_first_dense)) if cfg.n_experts else [],
            router_aux_loss_coef=cfg.router_aux_loss_weight,
            output_router_logits=False,
            # Qwen2MoeConfig defaults qkv_bias to true; our attention has no biases. transformers >= 4.51 (PR 36735)
            # and 5.x honour the flag; older 4.x always built q/k/v biases.
            qkv_bias=False,
            use_sliding_window=window,
            sliding_window=cfg.sliding_window or None,
            # transformers 5 reads the explicit per-layer list; 4.x windows layers >= max_window_layers.
            layer_types=[("sliding_attention" if window else "full_attention")] * cfg.n_layers,
            max_window_layers=0 if window else cfg.n_layers,
        )
    return d


def from_hf_config(d: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig of a llama / mixtral / qwen2_moe config.json; anything that would change the maths but that the
    model does not implement (biases, RoPE scaling, per-layer windows, ...) raises HFFormatError naming it."""
    fam = d.get("model_type")
    if fam not in FAMILIES:
        raise HFFormatError(f"unsupported Hugging Face model_type {fam!r}; supported: {', '.join(FAMILIES)}")

    def need(key):
        if d.get(key) is None:
            raise HFFormatError(f"config.json ({fam}) is missing {key!r}")
        return d[key]

    hidden, n_heads, n_layers = int(need("hidden_size")), int(need("num_attention_heads")), int(need("num_hidden_layers"))
    head_dim = int(d.get("head_dim") or hidden // n_heads)
    for key in ("attention_bias", "mlp_bias") if fam == "llama" else ():
        if d.get(key):
            raise HFFormatError(f"unsupported {key}=true: the model has no biases")
    if fam == "qwen2_moe" and d.get("qkv_bias", True):
        raise HFFormatError("unsupported qwen2_moe qkv_bias=true (or missing, which defaults to true): "
                            "the model has no attention biases")
    if d.get("pretraining_tp", 1) != 1:
        raise HFFormatError(f"unsupported pretraining_tp={d['pretraining_tp']}")
    if d.get("attention_dropout"):
        raise HFFormatError(f"unsupported attention_dropout={d['attention_dropout']}: the model has no dropout")
    fields: dict[str, Any] = dict(
        vocab_size=int(need("vocab_size")),
        d_model=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=0 if head_dim * n_heads == hidden else head_dim,
        d_ff=int(need("intermediate_size")),
        max_seq_len=int(d.get("max_position_embeddings") or ModelConfig.max_seq_len),
        rope_theta=_rope_theta(d),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        activation=d.get("hidden_act", "silu"),
        sliding_window=_sliding_window(d, fam, n_layers),
        init_std=float(d.get("initializer_range", ModelConfig.init_std)),
    )
    if fam == "mixtral":
        fields.update(n_experts=int(need("num_local_experts")), n_experts_per_tok=int(need("num_experts_per_tok")),
                      norm_topk_prob=True, router_jitter=float(d.get("router_jitter_noise") or 0.0),
                      router_aux_loss_weight=float(d.get("router_aux_loss_coef", 0.001)))
    elif fam == "qwen2_moe" and int(d.get("num_experts") or 0) > 0:
        fields.update(_qwen2_moe_layout(d, n_layers, fields["d_ff"], need))
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise HFFormatError(f"config.json ({fam}) gives an invalid model: {e}") from None


def _rope_theta(d: Mapping[str, Any]) -> float:
    params, scaling = d.get("rope_parameters"), d.get("rope_scaling")
    rope = params if params is not None else (scaling or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise HFFormatError(f"unsupported rope_type {rope_type!r}: only default RoPE is implemented")
    theta = (params or {}).get("rope_theta", d.get("rope_theta", 10000.0))
    return float(theta)


def _sliding_window(d: Mapping[str, Any], fam: str, n_layers: int) -> int:
    if fam == "llama":
        return 0
    if fam == "mixtral":
        return int(d.get("sliding_window") or 0)
    if not d.get("use_sliding_window"):
        return 0
    window = int(d.get("sliding_window") or 0)
    layer_types = d.get("layer_types")
    if layer_types is None:  # transformers 5's derivation when the list is absent
        mwl = d.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if (i + 1) % 2 and i < mwl else "full_attention" for i in range(n_layers)]
    if len(set(layer_types)) > 1:
        raise HFFormatError(f"unsupported per-layer attention windows (layer_types={list(layer_types)}): "
                            "the model has one window for every layer")
    return window if layer_types and layer_types[0] == "sliding_attention" else 0


def _qwen2_moe_layout(d, n_layers: int, d_ff: int, need) -> dict[str, Any]:
    n_experts, step = int(d["num_experts"]), int(d.get("decoder_sparse_step") or 1)
    mlp_only = set(d.get("mlp_only_layers") or [])
    moe = [i not in mlp_only and (i + 1) % step == 0 for i in range(n_layers)]
    if not any(moe):
        raise HFFormatError(f"qwen2_moe num_experts={n_experts} but mlp_only_layers/decoder_sparse_step leave no "
                            "MoE layer")
    # ours: layer i is MoE iff i >= moe_first_dense and (i + 1) % moe_every == 0; the smallest moe_first_dense
    # that selects the same first MoE layer keeps import(export(config)) == config.
    first = max(0, moe.index(True) - step + 1)
    ours = [i >= first and (i + 1) % step == 0 for i in range(n_layers)]
    if ours != moe:
        raise HFFormatError(f"unsupported qwen2_moe layer layout mlp_only_layers={sorted(mlp_only)} with "
                            f"decoder_sparse_step={step}: only leading dense layers can be excluded")
    moe_d_ff = int(need("moe_intermediate_size"))
    return dict(n_experts=n_experts, n_experts_per_tok=int(need("num_experts_per_tok")),
                moe_d_ff=0 if moe_d_ff == d_ff else moe_d_ff, moe_every=step, moe_first_dense=first,
                shared_expert_d_ff=int(d.get("shared_expert_intermediate_size") or 0),
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                router_aux_loss_weight=float(d.get("router_aux_loss_coef", 0.001)))


# ---------------------------------------------------------------------------------------------------------- tensors

@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One Hugging Face tensor <-> one slice `leaf[index]` of the JAX parameter at `jax_path`.

    layout "zeros" is an inert tensor with no JAX counterpart (the zero-width shared expert transformers builds
    when `shared_expert_intermediate_size=0`): written as zeros so loading reports no missing weights, skipped on
    import."""

    hf_name: str
    jax_path: tuple[str, ...]
    index: tuple[int, ...]
    layout: str
    zeros_shape: tuple[int, ...] = ()

    def hf_shape(self, jax_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.layout == "zeros":
            return self.zeros_shape
        if self.layout == "copy":
            return tuple(jax_shape)
        if self.layout == "transpose":
            return tuple(jax_shape[::-1])
        if self.layout == "heads_in":  # [D, N, hd] -> [N*hd, D]
            return (jax_shape[1] * jax_shape[2], jax_shape[0])
        return (jax_shape[2], jax_shape[0] * jax_shape[1])  # heads_out: [N, hd, D] -> [D, N*hd]

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.layout == "copy":
            return np.ascontiguousarray(x)
        if self.layout == "transpose":
            return np.ascontiguousarray(x.T)
        if self.layout == "heads_in":
            return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
        if self.layout == "heads_out":
            return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
        raise ValueError(f"{self.hf_name}: layout {self.layout!r} has no JAX source")

    def from_hf(self, t: np.ndarray, jax_shape: tuple[int, ...]) -> np.ndarray:
        return t.reshape(jax_shape) if self.layout == "copy" else t.T.reshape(jax_shape)


def tensor_table(config: ModelConfig) -> list[TensorMap]:
    """Every Hugging Face tensor of `config`'s export, in layer order (stages and units run in layer order)."""
    fam = family(config)
    table = [TensorMap("model.embed_tokens.weight", ("embed_tokens", "embedding"), (), "copy")]
    for stage in layer_plan(config):
        for unit in range(stage.n_units):
            for block, is_moe in enumerate(stage.unit):
                i = stage.layer_index(unit, block)
                table += _layer_tensors(config, fam, f"model.layers.{i}", (stage.name, f"block_{block}"), unit, is_moe)
    table.append(TensorMap("model.norm.weight", ("norm", "scale"), (), "copy"))
    if not config.tie_embeddings:
        table.append(TensorMap("lm_head.weight", ("lm_head", "kernel"), (), "transpose"))
    return table


def _layer_tensors(cfg: ModelConfig, fam: str, hf: str, block: tuple[str, str], unit: int, is_moe: bool):
    u = (unit,)
    out = [TensorMap(f"{hf}.input_layernorm.weight", block + ("input_layernorm", "scale"), u, "copy"),
           TensorMap(f"{hf}.post_attention_layernorm.weight", block + ("post_attention_layernorm", "scale"), u, "copy")]
    for proj in ("q_proj", "k_proj", "v_proj"):
        out.append(TensorMap(f"{hf}.self_attn.{proj}.weight", block + ("self_attn", proj, "kernel"), u, "heads_in"))
    out.append(TensorMap(f"{hf}.self_attn.o_proj.weight", block + ("self_attn", "o_proj", "kernel"), u, "heads_out"))
    if not is_moe:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out.append(TensorMap(f"{hf}.mlp.{proj}.weight", block + ("mlp", proj, "kernel"), u, "transpose"))
        return out
    moe = block + ("moe",)
    mlp = f"{hf}.block_sparse_moe" if fam == "mixtral" else f"{hf}.mlp"
    out.append(TensorMap(f"{mlp}.gate.weight", moe + ("router", "kernel"), u, "transpose"))
    for e in range(cfg.n_experts):
        for proj, leaf in (("gate_proj", "wi_gate"), ("up_proj", "wi_up"), ("down_proj", "wo")):
            name = MIXTRAL_EXPERT_NAMES[proj] if fam == "mixtral" else proj
            out.append(TensorMap(f"{mlp}.experts.{e}.{name}.weight", moe + (leaf,), (unit, e), "transpose"))
    if fam == "qwen2_moe":
        shared = cfg.shared_expert_d_ff
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"{mlp}.shared_expert.{proj}.weight"
            if shared:
                out.append(TensorMap(name, moe + ("shared_expert", proj, "kernel"), u, "transpose"))
            else:
                zero_shape = (cfg.d_model, 0) if proj == "down_proj" else (0, cfg.d_model)
                out.append(TensorMap(name, (), (), "zeros", zero_shape))
        if shared:
            out.append(TensorMap(f"{mlp}.shared_expert_gate.weight", moe + ("shared_expert_gate", "kernel"), u,
                                 "transpose"))
        else:
            out.append(TensorMap(f"{mlp}.shared_expert_gate.weight", (), (), "zeros", (1, cfg.d_model)))
    return out
