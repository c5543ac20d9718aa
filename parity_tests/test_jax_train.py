"""Training parity: the same init and batches through 20 AdamW steps in JAX (the trainer's optimizer: warmup +
cosine schedule, global-norm clipping, weight decay on matrices only) and in the twin (torch.optim.AdamW with the
twin's decay mask) give the same loss at every step."""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
import optax
import pytest
import torch

from parity_tests import jax_models as jm
from parity_tests.tolerances import TRAIN_LOSS_REL
from ultrathink_jax.train.optim import make_optimizer
from ultrathink_torch import build_adamw, load_pretrained

STEPS = 20
OPTIM = ml_collections.ConfigDict(dict(learning_rate=3e-3, schedule="cosine", warmup_steps=5, min_lr_ratio=0.1,
                                       b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=0.5))


def reference_lr(step: int) -> float:
    """The documented schedule, written out independently: linear warmup reaching the peak at step warmup-1,
    then cosine decay to min_lr_ratio * peak at the last step."""
    peak, end, warmup = OPTIM.learning_rate, OPTIM.learning_rate * OPTIM.min_lr_ratio, OPTIM.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(STEPS - warmup, 1))
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def jax_losses(name: str) -> list[float]:
    cfg = jm.config(name)
    tx, _ = make_optimizer(OPTIM, STEPS)
    params = jm.params(name, "random")
    state = tx.init(params)
    grad_fn = jm.loss_and_grad(cfg)
    update = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
    losses = []
    for step in range(STEPS):
        loss, grads = grad_fn(params, jm.text_batch(4, 32, seed=step, held_out=False))
        params, state = update(params, state, grads)
        losses.append(float(loss))
    return losses


def twin_losses(name: str) -> list[float]:
    model = load_pretrained(jm.export_dir(name, "random")).train()
    opt = build_adamw(model, lr=OPTIM.learning_rate, weight_decay=OPTIM.weight_decay, betas=(OPTIM.b1, OPTIM.b2),
                      eps=OPTIM.eps)
    moe = bool(jm.config(name).n_experts)
    losses = []
    for step in range(STEPS):
        ids = jm.torch_ids(jm.text_batch(4, 32, seed=step, held_out=False))
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids, output_router_logits=moe).loss
        loss.backward()
        for p in model.parameters():
            if p.grad is None:  # an expert no token chose: optax still applies momentum and decay to it
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in model.parameters()]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        scale = min(1.0, OPTIM.grad_clip / float(norm))  # optax.clip_by_global_norm: no epsilon
        for g in grads:
            g.mul_(scale)
        for group in opt.param_groups:
            group["lr"] = reference_lr(step)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name", list(jm.MODELS))
def test_twenty_adamw_steps_give_the_same_losses(name):
    ours, twin = np.array(jax_losses(name)), np.array(twin_losses(name))
    rel = np.abs(ours - twin) / np.maximum(1.0, np.abs(twin))
    worst = int(rel.argmax())
    assert rel[worst] <= TRAIN_LOSS_REL, (
        f"{name}: step {worst} loss JAX {ours[worst]:.7f} vs twin {twin[worst]:.7f}, relative |Δ|={rel[worst]:.2e} "
        f"> {TRAIN_LOSS_REL:g}; all JAX {np.round(ours, 5).tolist()}, twin {np.round(twin, 5).tolist()}")
    assert ours[-1] < ours[0] - 0.3, f"{name}: 20 steps did not train (loss {ours[0]:.3f} -> {ours[-1]:.3f})"


def test_reference_schedule_matches_the_trainers_schedule():
    _, schedule = make_optimizer(OPTIM, STEPS)
    got = [float(schedule(s)) for s in range(STEPS)]
    want = [reference_lr(s) for s in range(STEPS)]
    assert np.allclose(got, want, rtol=1e-6), f"trainer schedule {got} vs reference {want}"
