"""Greedy generation of 32 tokens from the same prompt: JAX (ultrathink_jax.generate), the twin and
transformers' generate produce identical tokens (trained weights, real-text prompt)."""

from __future__ import annotations

import pytest
import torch

from parity_tests import jax_models as jm
from ultrathink_jax.generate import generate
from ultrathink_torch import generate as twin_generate

NEW_TOKENS = 32


@pytest.mark.parametrize("name", list(jm.MODELS))
def test_greedy_tokens_are_identical_in_jax_twin_and_transformers(name):
    prompt = jm.text_batch(1, 16, seed=11)[0].tolist()
    ours = generate(jm.params(name, "trained"), jm.config(name), [prompt], NEW_TOKENS, mesh=jm.one_device_mesh())[0]
    ids = torch.tensor([prompt])
    twin = twin_generate(jm.twin(name, "trained"), ids, NEW_TOKENS)[0, len(prompt):].tolist()
    with torch.no_grad():
        ref = jm.hf(name, "trained").generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    ref = ref[0, len(prompt):].tolist()
    assert twin == ref, f"{name}: twin {twin} vs transformers {ref}"
    assert ours == ref, f"{name}: JAX {ours} vs transformers {ref} (first difference at {_first_diff(ours, ref)})"


def _first_diff(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
