"""AdamW with the usual weight-decay mask: matrices decay, 1-D parameters (norm weights, biases) do not."""

from __future__ import annotations

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
