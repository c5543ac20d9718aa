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
    # Accumulate layer by layer (same summation order as transformers, which keeps fp32 results within ~1e-7).
    assigned = torch.zeros(num_experts, device=router_logits[0].device)
    prob_mass = torch.zeros(num_experts, device=router_logits[0].device)
    tokens = 0.0
    for layer_logits in router_logits:
        probs = F.softmax(layer_logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        weight = torch.ones(probs.shape[0], device=probs.device)
        if attention_mask is not None:
            weight = attention_mask.reshape(-1).to(probs.device, torch.float32)
        assigned = assigned + torch.zeros_like(assigned).scatter_add_(0, chosen.reshape(-1), weight.repeat_interleave(top_k))
        prob_mass = prob_mass + (probs * weight[:, None]).sum(dim=0)
        tokens = tokens + weight.sum()
    f, p = assigned / tokens, prob_mass / tokens  # f sums to top_k, p to 1
    return num_experts * (f * p).sum()
