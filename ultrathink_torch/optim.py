"""AdamW with the usual weight-decay mask (matrices decay, 1-D parameters such as norm weights do not) and the
JAX trainer's learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def decay_mask(model: nn.Module) -> dict[str, bool]:
    """Parameter name -> whether weight decay applies (True for tensors with ndim >= 2)."""
    return {name: p.ndim >= 2 for name, p in model.named_parameters() if p.requires_grad}


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    params = dict(model.named_parameters())
    mask = decay_mask(model)
    groups = [
        {"params": [params[n] for n, decays in mask.items() if decays], "weight_decay": weight_decay},
        {"params": [params[n] for n, decays in mask.items() if not decays], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def learning_rate(step: int, peak: float, total_steps: int, warmup_steps: int, schedule: str = "cosine",
                  min_lr_ratio: float = 0.1) -> float:
    """The JAX trainer's schedule, written independently: linear warmup reaching `peak` at step warmup - 1 (step s
    gets peak * (s + 1) / warmup), then cosine or linear decay to min_lr_ratio * peak at `total_steps`, or constant."""
    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; expected cosine, linear or constant")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    end = peak * min_lr_ratio
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1)))
    if schedule == "cosine":
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return peak + (end - peak) * progress
    return peak
