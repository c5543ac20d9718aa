"""Twin gradients vs transformers: every parameter, loss = CE (+ coef * aux for MoE)."""

from __future__ import annotations

import pytest
import torch

from parity_tests.conftest import MOE_VARIANTS, VARIANTS, token_batch
from parity_tests.tolerances import assert_grads_close
from ultrathink_torch import load_pretrained, to_twin_names


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_parameter_gradient_matches_transformers(name, reference):
    hf, path = reference(name)
    model = load_pretrained(path)  # fresh copy: gradients must not leak into the shared twin
    ids, moe = token_batch(2, 12, seed=7), name in MOE_VARIANTS
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding also exercises the masked aux-loss statistics
    # No loss on padding, nor on the first real token: it would be predicted from a padding slot, whose
    # output is implementation-defined (that query sees no key at all).
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 3] = -100
    try:
        model(ids, attention_mask=mask, labels=labels, output_router_logits=moe).loss.backward()
        hf(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=moe).loss.backward()
        ref = to_twin_names({n: p.grad for n, p in hf.named_parameters() if p.numel()}, model.config)
    finally:
        hf.zero_grad(set_to_none=True)
    ours = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in ours.values()), [n for n, g in ours.items() if g is None]
    assert_grads_close(ours, ref)
