"""JAX vs twin vs transformers forward parity on exported checkpoints: logits, chosen experts, aux loss.

Every model runs with random and with trained weights, on real text and on random token ids.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity_tests import jax_models as jm
from parity_tests.tolerances import assert_aux_close, assert_logits_close
from ultrathink_jax.moe.router import pooled_load_balance_loss

CASES = [(name, weights) for name in jm.MODELS for weights in jm.WEIGHTS]
MOE_CASES = [(n, w) for n, w in CASES if jm.MODELS[n].get("n_experts")]


def _torch_outputs(model, tokens, moe: bool):
    with torch.no_grad():
        return model(jm.torch_ids(tokens), output_router_logits=moe)


@pytest.mark.parametrize("name,weights", CASES)
def test_exported_model_loads_as_the_expected_transformers_class(name, weights):
    assert type(jm.hf(name, weights)).__name__.lower().startswith(jm.FAMILY[name].replace("_", "")), \
        f"{name} loaded as {type(jm.hf(name, weights)).__name__}, expected the {jm.FAMILY[name]} family"


@pytest.mark.parametrize("name,weights", CASES)
def test_logits_match_twin_and_transformers(name, weights):
    cfg = jm.config(name)
    for label, tokens in jm.batches():
        ours = torch.from_numpy(jm.forward(cfg, jm.params(name, weights), tokens)[0])
        twin = _torch_outputs(jm.twin(name, weights), tokens, False).logits
        ref = _torch_outputs(jm.hf(name, weights), tokens, False).logits
        assert_logits_close(ours, ref, f"{name}/{weights}/{label}: JAX vs transformers logits")
        assert_logits_close(twin, ref, f"{name}/{weights}/{label}: twin vs transformers logits")
        assert_logits_close(ours, twin, f"{name}/{weights}/{label}: JAX vs twin logits")


def _top_k(router_logits: np.ndarray, k: int) -> np.ndarray:
    probs = torch.softmax(torch.as_tensor(router_logits, dtype=torch.float32), -1)
    return torch.topk(probs, k).indices.sort(-1).values.numpy()


def _near_tie(router_logits: np.ndarray, k: int, eps: float = 1e-5) -> np.ndarray:
    """Tokens whose k-th and (k+1)-th router probabilities are within eps: either choice is correct."""
    probs = np.sort(torch.softmax(torch.as_tensor(router_logits), -1).numpy(), -1)[:, ::-1]
    return np.abs(probs[:, k - 1] - probs[:, k]) <= eps


@pytest.mark.parametrize("name,weights", MOE_CASES)
def test_every_token_routes_to_the_same_top_k_experts(name, weights):
    cfg = jm.config(name)
    k = cfg.n_experts_per_tok
    for label, tokens in jm.batches():
        _, _, ours = jm.forward(cfg, jm.params(name, weights), tokens)
        ref = [r.numpy() for r in _torch_outputs(jm.hf(name, weights), tokens, True).router_logits]
        twin = [r.numpy() for r in _torch_outputs(jm.twin(name, weights), tokens, True).router_logits]
        assert len(ours) == len(ref) == len(twin), f"MoE layers: JAX {len(ours)}, twin {len(twin)}, HF {len(ref)}"
        for layer, (a, t, r) in enumerate(zip(ours, twin, ref)):
            ties = _near_tie(r, k)
            for who, got in (("JAX", a), ("twin", t)):
                bad = np.flatnonzero((_top_k(got, k) != _top_k(r, k)).any(-1) & ~ties)
                assert bad.size == 0, (f"{name}/{weights}/{label} MoE layer {layer}: {who} routes tokens "
                                       f"{bad[:5].tolist()} to {_top_k(got, k)[bad[:5]].tolist()}, transformers "
                                       f"to {_top_k(r, k)[bad[:5]].tolist()}")


@pytest.mark.parametrize("name,weights", MOE_CASES)
def test_aux_loss_matches_twin_and_transformers(name, weights):
    cfg = jm.config(name)
    for label, tokens in jm.batches():
        _, aux, _ = jm.forward(cfg, jm.params(name, weights), tokens)
        ours = torch.tensor(float(pooled_load_balance_loss(aux["moe"])))
        ref = _torch_outputs(jm.hf(name, weights), tokens, True).aux_loss
        twin = _torch_outputs(jm.twin(name, weights), tokens, True).aux_loss
        assert_aux_close(ours, ref)
        assert_aux_close(twin, ref)


@pytest.mark.parametrize("name", list(jm.MODELS))
def test_trained_weights_predict_held_out_text_better_than_chance(name):
    """Guard: the `trained` cases really are trained (loss well below log(256) = 5.55 on held-out text)."""
    tokens = jm.text_batch(4, seed=7)
    loss = float(jm.loss_and_grad(jm.config(name))(jm.params(name, "trained"), tokens)[0])
    assert loss < 3.5, f"{name}: held-out loss {loss:.3f} after {jm.TRAIN_STEPS} steps; training did not work"
