"""The trainer's objective (`train.steps.micro_batch_loss`: token-weighted cross-entropy + logit z-loss + MoE router
losses) and every parameter's gradient of it, JAX vs the twin's (`ultrathink_torch.train.micro_batch_objective`),
on packed rows with several documents each: random weights on random ids, trained weights on real text."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
import torch

from parity_tests import jax_models as jm
from parity_tests.tolerances import FP32_GRAD_ATOL, JAX_TWIN_GRAD_REL, assert_grads_close, assert_loss_close
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.train.steps import micro_batch_loss
from ultrathink_torch import StepConfig, load_pretrained
from ultrathink_torch.train import micro_batch_objective

Z_LOSS = 1e-2
# Both MoE objectives: mixtral with the trainer's default (mean of per-layer balance losses + router z-loss),
# qwen2_moe with transformers' balance loss pooled over layers.
MODEL_FIELDS = {"dense": {}, "mixtral": dict(router_aux_loss_per_layer=True, router_z_loss_weight=1e-3),
                "qwen2_moe": {}}
CASES = [(name, weights) for name in jm.MODELS for weights in jm.WEIGHTS]


@functools.lru_cache(maxsize=None)
def objective_and_grad(cfg: ModelConfig):
    """jitted (params, batch) -> (objective per target token, its gradient tree)."""
    def per_token(params, batch):
        objective, parts = micro_batch_loss(cfg, Z_LOSS, params, batch, jax.random.PRNGKey(0))
        return objective / parts["weight_sum"]
    return jax.jit(jax.value_and_grad(per_token))


@pytest.mark.parametrize("name,weights", CASES)
def test_objective_and_every_gradient_match_twin(name, weights):
    cfg = jm.config(name, **MODEL_FIELDS[name])
    batch = jm.packed_batch(4, seed=4, random_ids=weights == "random")
    loss, grads = objective_and_grad(cfg)(jm.params(name, weights), {k: jnp.asarray(v) for k, v in batch.items()})
    model = load_pretrained(jm.export_dir(name, weights))  # fresh copy: gradients accumulate in place
    objective, parts = micro_batch_objective(
        model, {k: torch.from_numpy(v) for k, v in batch.items()},
        StepConfig(z_loss_weight=Z_LOSS, router_aux_loss_per_layer=cfg.router_aux_loss_per_layer,
                   router_z_loss_weight=cfg.router_z_loss_weight))
    twin_loss = objective / parts["weight_sum"]
    twin_loss.backward()
    assert_loss_close(torch.tensor(float(loss)), twin_loss.detach(), f"{name}/{weights}: JAX vs twin objective")
    ours = jm.jax_tree_to_twin(cfg, grads)
    # An expert that no token chose gets no gradient in torch: its gradient is exactly zero.
    twin = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}
    assert_grads_close(ours, twin, rel=JAX_TWIN_GRAD_REL, atol=FP32_GRAD_ATOL, what=f"{name}/{weights}: JAX vs twin")
