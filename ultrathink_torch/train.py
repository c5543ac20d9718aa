"""The twin's training step: `ultrathink_jax.train.steps.train_step` term for term, in PyTorch, so the parity suite
can run both trainers side by side on the same packed batches.

A batch is the JAX data pipeline's dict of (B, T) tensors: inputs, targets, segment_ids, positions (long) and
weights (float; 0 where a target crosses a document boundary). Its rows are split into `grad_accum` micro-batches
(micro-batch m takes rows m, m + n, m + 2n, ...). Each micro-batch's objective is a sum over its target tokens,

    sum_t w_t CE_t  +  z_loss_weight * sum_t w_t logsumexp_t^2  +  moe_loss * sum_t w_t,

where moe_loss = router_aux_loss_coef * load-balance loss (+ router_z_loss_weight * router z-loss) of that
micro-batch alone. The gradients of all micro-batches are added and divided once by the batch's total target
weight (so n micro-batches equal one n-times batch), clipped to a global norm and applied by AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .losses import load_balancing_loss
from .model import CausalLM

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


@dataclass(frozen=True)
class StepConfig:
    """The JAX trainer's `train.grad_accum`, `train.z_loss_weight` and `optim.grad_clip`, and the two router-loss
    options of its ModelConfig that a Hugging Face config.json does not carry (the aux-loss weight is the
    checkpoint's own `router_aux_loss_coef`)."""
    grad_accum: int = 1
    z_loss_weight: float = 0.0  # PaLM's z-loss on the output logits
    grad_clip: float = 0.0  # global gradient norm; 0 = no clipping
    router_aux_loss_per_layer: bool = False  # mean of the per-layer losses, not transformers' pooled one
    router_z_loss_weight: float = 0.0  # ST-MoE z-loss on the router logits

    def __post_init__(self):
        for name in ("z_loss_weight", "grad_clip", "router_z_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"StepConfig.{name}={getattr(self, name)!r} must be >= 0")
        if self.grad_accum < 1:
            raise ValueError(f"StepConfig.grad_accum={self.grad_accum!r} must be positive")


def moe_loss(model: CausalLM, router_logits: tuple[torch.Tensor, ...], valid: torch.Tensor,
             config: StepConfig) -> torch.Tensor:
    """router_aux_loss_coef * load balance + router_z_loss_weight * router z-loss, over `valid` (B, T) tokens."""
    cfg = model.config
    if config.router_aux_loss_per_layer:
        balance = torch.stack([load_balancing_loss((r,), cfg.num_experts, cfg.num_experts_per_tok, valid)
                               for r in router_logits]).mean()
    else:
        balance = load_balancing_loss(router_logits, cfg.num_experts, cfg.num_experts_per_tok, valid)
    weight = valid.reshape(-1).float()
    z_sum = sum((torch.logsumexp(r.float(), dim=-1).square() * weight).sum() for r in router_logits)
    z = z_sum / (weight.sum() * len(router_logits)).clamp(min=1.0)
    return cfg.router_aux_loss_coef * balance + config.router_z_loss_weight * z


def micro_batch_objective(model: CausalLM, batch: dict[str, torch.Tensor], config: StepConfig
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(objective summed over target tokens, its parts: ce_sum, weight_sum, z_sum, moe_loss_sum)."""
    moe = any(model.config.moe_layers)
    out = model(batch["inputs"], position_ids=batch["positions"], segment_ids=batch["segment_ids"],
                output_router_logits=moe)
    logits = out.logits.float()
    weights = batch["weights"].float()
    log_z = torch.logsumexp(logits, dim=-1)
    ce = F.cross_entropy(logits.flatten(0, 1), batch["targets"].long().flatten(), reduction="none").view_as(weights)
    parts = {"ce_sum": (ce * weights).sum(), "weight_sum": weights.sum()}
    objective = parts["ce_sum"]
    if config.z_loss_weight:
        parts["z_sum"] = (log_z.square() * weights).sum()
        objective = objective + config.z_loss_weight * parts["z_sum"]
    if moe:
        parts["moe_loss_sum"] = moe_loss(model, out.router_logits, batch["segment_ids"] > 0, config) * parts["weight_sum"]
        objective = objective + parts["moe_loss_sum"]
    return objective, parts


def train_step(model: CausalLM, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               learning_rate: float, config: StepConfig) -> dict[str, float]:
    """One optimizer step on `batch` at `learning_rate`; returns the JAX step's metrics (loss = token-weighted mean
    cross-entropy, z_loss / moe_loss per target token, grad_norm before clipping, learning_rate, tokens)."""
    rows = batch["inputs"].shape[0]
    if rows % config.grad_accum:
        raise ValueError(f"a batch of {rows} rows does not split into grad_accum={config.grad_accum} micro-batches")
    model.train()
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    for m in range(config.grad_accum):
        objective, parts = micro_batch_objective(model, {k: batch[k][m::config.grad_accum] for k in BATCH_KEYS}, config)
        objective.backward()  # gradients add up over micro-batches
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.detach()
    denom = sums["weight_sum"].clamp(min=1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # an expert no token chose: optax still moves it by momentum and weight decay
            p.grad = torch.zeros_like(p)
        p.grad.div_(denom)
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    if config.grad_clip and grad_norm >= config.grad_clip:  # optax.clip_by_global_norm: no epsilon
        for p in params:
            p.grad.mul_(config.grad_clip / grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    optimizer.step()
    metrics = {"loss": float(sums["ce_sum"] / denom), "grad_norm": float(grad_norm), "learning_rate": learning_rate,
               "tokens": float(sums["weight_sum"])}
    if "z_sum" in sums:
        metrics["z_loss"] = float(sums["z_sum"] / denom)
    if "moe_loss_sum" in sums:
        metrics["moe_loss"] = float(sums["moe_loss_sum"] / denom)
    return metrics
