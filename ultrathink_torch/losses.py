"""Next-token cross-entropy and the Switch-style load-balancing loss, matching transformers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean CE of logits[:, t] against labels[:, t + 1] over labels != -100.

    With loss_weights (B, T), each target token labels[:, t] counts with weight loss_weights[:, t] and the
    result is sum(w * ce) / sum(w); without them this equals transformers' ForCausalLMLoss.
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(logits.shape[:2])}")
    logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    if loss_weights is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    if loss_weights.shape != labels.shape:
        raise ValueError(f"loss_weights have shape {tuple(loss_weights.shape)}, expected {tuple(labels.shape)}")
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    w = loss_weights[:, 1:].reshape(-1).float() * (targets != IGNORE_INDEX)
    return (ce * w).sum() / w.sum()


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """E * sum_e f_e * P_e, pooled over all MoE layers' tokens (transformers' load_balancing_loss_func).

    f_e: fraction of top-k assignments that go to expert e (sums to top_k); P_e: mean router probability of e.
    router_logits: one (B*T, E) tensor per MoE layer; attention_mask (B, T) drops padding tokens.
    """
    logits = torch.cat([r.float() for r in router_logits], dim=0)
    probs = F.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    assignments = F.one_hot(chosen, num_experts).sum(dim=1).float()  # (N, E)
    if attention_mask is None:
        weight = torch.ones(logits.shape[0], 1, device=logits.device)
    else:
        weight = attention_mask.reshape(-1, 1).float().repeat(len(router_logits), 1)
    tokens = weight.sum()
    f = (assignments * weight).sum(0) / tokens
    p = (probs * weight).sum(0) / tokens
    return num_experts * (f * p).sum()
