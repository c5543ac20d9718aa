"""Loss and every parameter's gradient: JAX vs the twin, on exported tiny models (random and trained weights)."""

from __future__ import annotations

import pytest
import torch

from parity_tests import jax_models as jm
from parity_tests.tolerances import FP32_GRAD_ATOL, JAX_TWIN_GRAD_REL, assert_grads_close, assert_loss_close
from ultrathink_torch import load_pretrained

# Random weights on random ids, trained weights on real text (the forward tests run every combination).
CASES = [(name, weights) for name in jm.MODELS for weights in jm.WEIGHTS]
BATCH = {"random": lambda: ("random_ids", jm.random_batch(2, seed=4)), "trained": lambda: ("text", jm.text_batch(2, seed=4))}


@pytest.mark.parametrize("name,weights", CASES)
def test_loss_and_every_gradient_match_twin(name, weights):
    cfg = jm.config(name)
    moe = bool(cfg.n_experts)
    for label, tokens in [BATCH[weights]()]:
        loss, grads = jm.loss_and_grad(cfg)(jm.params(name, weights), tokens)
        model = load_pretrained(jm.export_dir(name, weights))  # fresh copy: gradients accumulate in place
        ids = jm.torch_ids(tokens)
        twin_loss = model(ids, labels=ids, output_router_logits=moe).loss
        twin_loss.backward()
        assert_loss_close(torch.tensor(float(loss)), twin_loss.detach(), f"{name}/{weights}/{label}: JAX vs twin loss")
        ours = jm.jax_tree_to_twin(cfg, grads)
        # An expert that no token chose gets no gradient in torch: its gradient is exactly zero.
        twin = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}
        assert_grads_close(ours, twin, rel=JAX_TWIN_GRAD_REL, atol=FP32_GRAD_ATOL, what=f"{name}/{weights}/{label}: JAX vs twin")
