"""Model configuration: one frozen, validated dataclass shared by the model, sharding, export and the twin."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ultrathink_jax.activations import ACTIVATIONS  # Hugging Face `hidden_act` names

REMAT_POLICIES = ("none", "dots_saveable", "full")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
MOE_DISPATCH = ("dropless", "capacity")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the value."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50257
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int = 12
    head_dim: int = 0  # 0 = d_model // n_heads
    d_ff: int = 2048  # SwiGLU intermediate size of dense layers
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    activation: str = "silu"
    sliding_window: int = 0  # 0 = full causal attention; else key j visible to query i iff i - window < j <= i
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype; params stay float32
    remat_policy: str = "none"
    attention_impl: str = "auto"  # auto: cuDNN flash attention on GPU, XLA elsewhere
    # Mixture-of-Experts (n_experts = 0: dense model). Layer i is MoE iff i >= moe_first_dense and
    # (i + 1) % moe_every == 0 -- Qwen2-MoE's mlp_only_layers / decoder_sparse_step, so export is exact.
    n_experts: int = 0
    n_experts_per_tok: int = 2
    moe_d_ff: int = 0  # 0 = d_ff
    moe_every: int = 1
    moe_first_dense: int = 0
    shared_expert_d_ff: int = 0  # 0 = no shared expert
    norm_topk_prob: bool = True
    router_jitter: float = 0.0
    moe_dispatch: str = "dropless"
    capacity_factor: float = 1.25
    router_aux_loss_weight: float = 0.01
    # True (default): the mean of the per-layer Switch losses, so every layer must balance (pooled, one layer's
    # collapse hides behind another's: measured per-layer factors 0.30-0.34 under a pooled 0.86, BENCHMARKS.md);
    # False: transformers' aux loss, which pools all layers' statistics (exactly the exported models' aux value).
    router_aux_loss_per_layer: bool = True
    router_z_loss_weight: float = 0.001
    # Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the router probabilities for the
    # top-k SELECTION only (combine weights stay the unbiased probabilities), moved by this much per step toward
    # balance: b_e += rate * sign(mean load - load_e). 0 = off. transformers' Mixtral / llama.cpp cannot express
    # the bias, so export refuses such a model (see hf/export.py).
    router_bias_update_rate: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            _require(name, getattr(self, name), getattr(self, name) > 0, "must be positive")
        _require("head_dim", self.head_dim, self.head_dim >= 0, "must be >= 0 (0 = d_model // n_heads)")
        _require("n_heads", self.n_heads, self.n_heads % self.n_kv_heads == 0,
                 f"must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim == 0:
            _require("d_model", self.d_model, self.d_model % self.n_heads == 0,
                     f"must be divisible by n_heads={self.n_heads} when head_dim is 0")
        _require("head_dim", self.resolved_head_dim, self.resolved_head_dim % 2 == 0,
                 "must be even (rotate-half RoPE pairs dimension i with i + head_dim/2)")
        _require("rope_theta", self.rope_theta, self.rope_theta > 0, "must be positive")
        _require("norm_eps", self.norm_eps, self.norm_eps > 0, "must be positive")
        _require("init_std", self.init_std, self.init_std > 0, "must be positive")
        _require("sliding_window", self.sliding_window, self.sliding_window >= 0, "must be >= 0 (0 = off)")
        _require("activation", self.activation, self.activation in ACTIVATIONS, f"must be one of {ACTIVATIONS}")
        _require("remat_policy", self.remat_policy, self.remat_policy in REMAT_POLICIES,
                 f"must be one of {REMAT_POLICIES}")
        _require("dtype", self.dtype, self.dtype in DTYPES, f"must be one of {DTYPES}")
        _require("attention_impl", self.attention_impl, self.attention_impl in ATTENTION_IMPLS,
                 f"must be one of {ATTENTION_IMPLS}")
        _require("n_experts", self.n_experts, self.n_experts >= 0, "must be >= 0 (0 = dense)")
        if self.n_experts:
            _require("n_experts_per_tok", self.n_experts_per_tok, 0 < self.n_experts_per_tok <= self.n_experts,
                     f"must be in [1, n_experts={self.n_experts}]")
            _require("moe_d_ff", self.moe_d_ff, self.moe_d_ff >= 0, "must be >= 0 (0 = d_ff)")
            _require("moe_every", self.moe_every, self.moe_every > 0, "must be positive")
            _require("moe_first_dense", self.moe_first_dense, 0 <= self.moe_first_dense < self.n_layers,
                     f"must be in [0, n_layers={self.n_layers})")
            _require("shared_expert_d_ff", self.shared_expert_d_ff, self.shared_expert_d_ff >= 0, "must be >= 0")
            _require("router_jitter", self.router_jitter, 0 <= self.router_jitter < 1, "must be in [0, 1)")
            _require("moe_dispatch", self.moe_dispatch, self.moe_dispatch in MOE_DISPATCH,
                     f"must be one of {MOE_DISPATCH}")
            _require("capacity_factor", self.capacity_factor, self.capacity_factor > 0, "must be positive")
            _require("router_aux_loss_weight", self.router_aux_loss_weight, self.router_aux_loss_weight >= 0,
                     "must be >= 0")
            _require("router_bias_update_rate", self.router_bias_update_rate, self.router_bias_update_rate >= 0,
                     "must be >= 0 (0 = off)")
            _require("router_z_loss_weight", self.router_z_loss_weight, self.router_z_loss_weight >= 0,
                     "must be >= 0")
            _require("n_experts", self.n_experts, any(self.is_moe_layer(i) for i in range(self.n_layers)),
                     "is set but moe_every/moe_first_dense select no MoE layer")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def resolved_moe_d_ff(self) -> int:
        return self.moe_d_ff or self.d_ff

    def is_moe_layer(self, i: int) -> bool:
        return self.n_experts > 0 and i >= self.moe_first_dense and (i + 1) % self.moe_every == 0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Builds from a dict / ConfigDict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"model config: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**dict(values))


def _require(name: str, value: Any, ok: bool, why: str) -> None:
    if not ok:
        raise ConfigError(f"model config: {name}={value!r} {why}")
