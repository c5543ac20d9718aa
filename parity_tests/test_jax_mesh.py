"""8 simulated devices vs 1: the trained parity models give the same logits, loss and gradients on several meshes,
and exporting the sharded params writes exactly the bytes of the 1-device export.

The repo-root conftest forces 8 host devices. Params are placed with the production shardings
(`param_shardings`) and the batch with `batch_sharding`, and the model runs under `sharding.activate(mesh)`,
so every logical-axis constraint inside the model is live. One jit per (model, mesh).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from parity_tests import jax_models as jm
from parity_tests.tolerances import FP32_GRAD_ATOL, MESH_GRAD_REL, assert_grads_close, assert_logits_close, assert_loss_close
from ultrathink_jax import sharding
from ultrathink_jax.hf import export_params
from ultrathink_jax.model import Transformer
from ultrathink_jax.params import param_shardings

FSDP = {"fsdp": 8}
DATA_FSDP_TENSOR = {"data": 2, "fsdp": 2, "tensor": 2}
TENSOR_FSDP = {"tensor": 2, "fsdp": 4}
EXPERT_FSDP = {"expert": 4, "fsdp": 2}
# Each mesh is a separate compile (~10 s on 2 cores), so each model gets the two plans that matter most for it;
# together every axis is exercised on dense and on MoE models.
CASES = [("dense", FSDP), ("dense", DATA_FSDP_TENSOR),
         ("mixtral", EXPERT_FSDP), ("mixtral", TENSOR_FSDP),
         ("qwen2_moe", EXPERT_FSDP), ("qwen2_moe", DATA_FSDP_TENSOR)]
IDS = [f"{name}-" + "x".join(f"{k}{v}" for k, v in axes.items()) for name, axes in CASES]
# The batch and length the trained weights were trained with: the 1-device loss and gradients reuse that compile.
BATCH, LENGTH = 8, 64


def tokens() -> np.ndarray:
    return jm.text_batch(BATCH, LENGTH, seed=11)


@functools.lru_cache(maxsize=None)
def one_device(name: str):
    """(loss, logits, grads) on one device, outside any mesh (the plain jitted functions of jax_models)."""
    cfg = jm.config(name)
    params = jm.params(name, "trained")
    loss, grads = jm.loss_and_grad(cfg)(params, tokens())
    logits = jm.forward(cfg, params, tokens())[0]
    return float(loss), logits, grads


@functools.lru_cache(maxsize=None)
def sharded(name: str, axes_items: tuple):
    """(loss, logits, grads, placed params) with params and batch sharded on the mesh."""
    cfg = jm.config(name)
    mesh = sharding.make_mesh(dict(axes_items))

    def loss_and_logits(p, t):
        return jm.lm_loss(cfg, p, t), Transformer(cfg).apply({"params": p}, *jm.inputs(t))[0]

    # Placed outside `activate`: unboxing abstract params under the mesh would add sharding constraints.
    params = jax.device_put(jm.params(name, "trained"), param_shardings(cfg, mesh))
    batch = jax.device_put(jnp.asarray(tokens()), sharding.batch_sharding(mesh))
    with sharding.activate(mesh):
        (loss, logits), grads = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True))(params, batch)
    return float(loss), np.asarray(logits), grads, params


def _named(tree) -> dict[str, torch.Tensor]:
    return {jax.tree_util.keystr(path): torch.from_numpy(np.array(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _case(name, axes):
    assert jax.device_count() == 8, f"the repo-root conftest must force 8 host devices, found {jax.device_count()}"
    return sharded(name, tuple(axes.items())), one_device(name)


@pytest.mark.parametrize("name,axes", CASES, ids=IDS)
def test_sharded_logits_equal_one_device(name, axes):
    (_, logits, _, _), (_, ref, _) = _case(name, axes)
    assert_logits_close(torch.from_numpy(logits), torch.from_numpy(ref), f"{name} on {axes} vs 1 device: logits")


@pytest.mark.parametrize("name,axes", CASES, ids=IDS)
def test_sharded_loss_equals_one_device(name, axes):
    (loss, _, _, _), (ref, _, _) = _case(name, axes)
    assert_loss_close(torch.tensor(loss), torch.tensor(ref), f"{name} on {axes} vs 1 device: LM + aux loss")


@pytest.mark.parametrize("name,axes", CASES, ids=IDS)
def test_sharded_gradients_equal_one_device(name, axes):
    (_, _, grads, _), (_, _, ref) = _case(name, axes)
    assert_grads_close(_named(grads), _named(ref), rel=MESH_GRAD_REL, atol=FP32_GRAD_ATOL, what=f"{name} on {axes} vs 1 device")


@pytest.mark.parametrize("name,axes", CASES, ids=IDS)
def test_export_from_sharded_params_is_bytewise_the_one_device_export(name, axes, tmp_path):
    (_, _, _, params), _ = _case(name, axes)
    assert any(leaf.addressable_shards[0].data.size < leaf.size for leaf in jax.tree.leaves(params)), \
        f"{name} on {axes}: no parameter is split across devices; the export would not gather anything"
    ours = jm.safetensors_contents(export_params(params, jm.config(name), tmp_path / "hf"))
    ref = jm.safetensors_contents(jm.export_dir(name, "trained"))
    assert ours.keys() == ref.keys(), f"tensor names differ: {sorted(ours.keys() ^ ref.keys())[:3]}"
    differ = [k for k in ref if ours[k] != ref[k]]
    assert not differ, f"{name} on {axes}: {len(differ)} exported tensors differ from the 1-device export, e.g. {differ[:3]}"
