"""A readable PyTorch decoder for the llama / mixtral / qwen2_moe checkpoints our JAX model exports.

Parameter names follow the Hugging Face layout (`model.layers.{i}.self_attn.q_proj.weight`, ...), with one
uniform MoE naming for both MoE families: router `mlp.gate`, experts `mlp.experts.{e}.{gate,up,down}_proj`,
optional `mlp.shared_expert.*` and `mlp.shared_expert_gate` (Qwen2-MoE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import TwinConfig
from .kv_cache import KVCache
from .losses import causal_lm_loss, load_balancing_loss

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, vocab)
    loss: torch.Tensor | None = None  # CE (+ router_aux_loss_coef * aux_loss when router logits are requested)
    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None  # one (B*T, n_experts) per MoE layer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight multiply, exactly as transformers does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of shape (B, T, head_dim) for rotate-half RoPE (dim i pairs with i + head_dim/2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, T, D); cos/sin: (B, T, D)
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def additive_attention_mask(
    q_start: int, n_q: int, n_k: int, window: int | None, key_valid: torch.Tensor | None, dtype: torch.dtype, device,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive mask (B or 1, 1, n_q, n_k). Indices are cache slots, as in transformers' masks:
    key j is visible to query i iff i - window < j <= i, key j is not padding and (packed rows, no cache)
    segment_ids[j] == segment_ids[i], so the documents of a row never see each other."""
    q_idx = torch.arange(q_start, q_start + n_q, device=device)[:, None]
    k_idx = torch.arange(n_k, device=device)[None, :]
    visible = k_idx <= q_idx
    if window is not None:
        visible = visible & (k_idx > q_idx - window)
    visible = visible[None, None]
    if key_valid is not None:
        visible = visible & key_valid[:, None, None, :n_k].bool()
    if segment_ids is not None:
        visible = visible & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    # finfo.min rather than -inf: fully masked rows (left padding) give a uniform softmax instead of NaN.
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)


class Attention(nn.Module):
    def __init__(self, cfg: TwinConfig, window: int | None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = window
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, key_valid, cache: KVCache | None, layer: int, segment_ids=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
        # Query head h reads KV head h // (n_heads // n_kv_heads).
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        scores = scores + additive_attention_mask(past, T, k.shape[2], self.window, key_valid, scores.dtype, x.device,
                                                  segment_ids)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(out)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.act = _ACTIVATIONS[act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Top-k routed experts. Router softmax in fp32 over all experts, then top-k; the k weights are
    renormalised to sum to 1 when `norm_topk_prob` (always for Mixtral)."""

    def __init__(self, cfg: TwinConfig):
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.jitter_noise = cfg.router_jitter_noise
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act) for _ in range(cfg.num_experts)
        )
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.hidden_act)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor):
        """x: (N, H) -> router logits (N, E), top-k weights (N, k), top-k expert ids (N, k)."""
        logits = self.gate(x)
        probs = F.softmax(logits.float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor):
        B, T, H = x.shape
        if self.training and self.jitter_noise > 0:
            # Mixtral's multiplicative router jitter (training only); it also feeds the experts, as in transformers.
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        flat = x.reshape(-1, H)
        logits, weights, experts = self.route(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(experts == e)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.view(B, T, H), logits


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TwinConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, cfg.layer_windows[layer])
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.moe_layers[layer]:
            self.mlp = SparseMoE(cfg)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, cos, sin, key_valid, cache, segment_ids=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_valid, cache, self.layer, segment_ids)
        h = self.post_attention_layernorm(x)
        router_logits = None
        if isinstance(self.mlp, SparseMoE):
            h, router_logits = self.mlp(h)
        else:
            h = self.mlp(h)
        return x + h, router_logits


class DecoderModel(nn.Module):
    def __init__(self, cfg: TwinConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left-padded rows: the first real token gets position 0 (padding slots get 0; they are never attended)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class CausalLM(nn.Module):
    def __init__(self, cfg: TwinConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def output_embedding(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        output_router_logits: bool = False,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids (B, T). attention_mask (B, past + T), 1 = real token, covers cached keys too.
        labels (B, T) use -100 to ignore; loss_weights (B, T) weight each label's token.
        Packed rows, as the JAX data pipeline makes them: segment_ids (B, T) number each row's documents (0 =
        padding) and position_ids (B, T) restart at 0 with each one; no attention_mask or cache then."""
        cfg = self.config
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if segment_ids is not None:
            if attention_mask is not None or cache is not None or position_ids is None:
                raise ValueError("segment_ids (packed rows) need position_ids and take no attention_mask or cache")
            if segment_ids.shape != (B, T) or position_ids.shape != (B, T):
                raise ValueError(f"segment_ids {tuple(segment_ids.shape)} and position_ids "
                                 f"{tuple(position_ids.shape)} must both have shape {(B, T)}")
            positions = position_ids
        elif position_ids is not None:
            raise ValueError("position_ids are only taken with segment_ids (packed rows)")
        elif attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
            positions = positions_from_mask(attention_mask)[:, past:]
        else:
            positions = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        router_logits = []
        for layer in self.model.layers:
            x, layer_router_logits = layer(x, cos, sin, attention_mask, cache, segment_ids)
            if layer_router_logits is not None:
                router_logits.append(layer_router_logits)
        if cache is not None:
            cache.advance(T)
        logits = F.linear(self.model.norm(x), self.output_embedding())

        out = CausalLMOutput(logits=logits)
        if output_router_logits and router_logits:
            out.router_logits = tuple(router_logits)
            # Padding is excluded from the balance statistics; only this call's tokens are routed.
            if segment_ids is not None:
                aux_mask = segment_ids > 0
            else:
                aux_mask = attention_mask[:, past:] if attention_mask is not None else None
            out.aux_loss = load_balancing_loss(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, aux_mask)
        if labels is not None:
            out.loss = causal_lm_loss(logits, labels, loss_weights)
            if out.aux_loss is not None:
                out.loss = out.loss + cfg.router_aux_loss_coef * out.aux_loss
        return out
