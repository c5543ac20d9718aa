"""Twin forward pass vs transformers on tiny random-weight checkpoints: logits, routing, aux loss, loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from parity_tests.conftest import MOE_VARIANTS, VARIANTS, VOCAB, token_batch
from parity_tests.tolerances import LOGITS_REL, assert_aux_close, assert_logits_close, assert_loss_close
from ultrathink_torch import CausalLM, causal_lm_loss

SEQ = 12  # longer than every sliding window in VARIANTS


def left_padded_batch():
    """Two rows of 12 slots; row 1 has 4 padding slots on the left."""
    ids = token_batch(2, SEQ, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    return ids, mask


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(name, reference, twin):
    hf, _ = reference(name)
    ids = token_batch(2, SEQ)
    with torch.no_grad():
        assert_logits_close(twin(name)(ids).logits, hf(ids).logits, f"{name} logits")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_left_padded_logits_match_transformers_on_real_tokens(name, reference, twin):
    hf, _ = reference(name)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ours = twin(name)(ids, attention_mask=mask).logits
        ref = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert_logits_close(ours[real], ref[real], f"{name} left-padded logits (real tokens)")


@pytest.mark.parametrize("name", ["mixtral_window", "qwen2_moe_step_window", "qwen2_moe_dense_window"])
def test_sliding_window_is_exercised(name, reference, twin):
    """Guard: the same weights without the window must NOT match, so the parity test above checks the window."""
    hf, _ = reference(name)
    model = twin(name)
    no_window = CausalLM(dataclasses.replace(model.config, layer_windows=(None,) * model.config.num_hidden_layers))
    no_window.load_state_dict(model.state_dict())
    ids = token_batch(1, SEQ)
    with torch.no_grad():
        ref = hf(ids).logits
        dev = float((no_window(ids).logits - ref).abs().max())
    assert dev > 100 * LOGITS_REL * max(1.0, float(ref.abs().max())), f"window had no visible effect (max|Δ|={dev:.2e})"


@pytest.mark.parametrize("name", MOE_VARIANTS)
def test_same_top_k_experts_per_token(name, reference, twin):
    hf, _ = reference(name)
    k = hf.config.num_experts_per_tok
    ids = token_batch(2, SEQ)
    with torch.no_grad():
        ours = twin(name)(ids, output_router_logits=True).router_logits
        ref = hf(ids, output_router_logits=True).router_logits
    assert len(ours) == len(ref), f"{len(ours)} MoE layers in twin vs {len(ref)} in transformers"
    for layer, (a, b) in enumerate(zip(ours, ref)):
        chosen_a = torch.topk(a.float().softmax(-1), k).indices.sort(-1).values
        chosen_b = torch.topk(b.float().softmax(-1), k).indices.sort(-1).values
        bad = (chosen_a != chosen_b).any(-1).nonzero().flatten().tolist()
        assert not bad, f"MoE layer {layer}: tokens {bad} route to {chosen_a[bad].tolist()} vs reference {chosen_b[bad].tolist()}"


@pytest.mark.parametrize("name", MOE_VARIANTS)
@pytest.mark.parametrize("padded", [False, True], ids=["dense_batch", "left_padded"])
def test_aux_loss_matches_transformers(name, padded, reference, twin):
    hf, _ = reference(name)
    ids, mask = left_padded_batch() if padded else (token_batch(2, SEQ), None)
    with torch.no_grad():
        ours = twin(name)(ids, attention_mask=mask, output_router_logits=True).aux_loss
        ref = hf(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    assert_aux_close(ours, ref)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_loss_matches_transformers_including_aux_term(name, reference, twin):
    hf, _ = reference(name)
    ids = token_batch(2, SEQ, seed=5)
    labels = ids.clone()
    labels[0, 7] = -100  # ignored targets are excluded from the mean
    moe = name in MOE_VARIANTS
    with torch.no_grad():
        ours = twin(name)(ids, labels=labels, output_router_logits=moe).loss
        ref = hf(input_ids=ids, labels=labels, output_router_logits=moe).loss
    assert_loss_close(ours, ref, f"{name} loss")


def test_per_token_weights_give_weighted_mean_of_token_losses():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (2, 5), generator=g)
    weights = torch.rand(2, 5, generator=g)
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="none")
    w = weights[:, 1:].reshape(-1)
    expected = (per_token * w).sum() / w.sum()
    got = causal_lm_loss(logits, labels, weights)
    assert torch.allclose(got, expected, rtol=1e-6), f"weighted loss {float(got):.7f} vs {float(expected):.7f}"


def test_uniform_weights_equal_unweighted_loss():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (2, 6), generator=g)
    labels[1, 3] = -100
    a, b = causal_lm_loss(logits, labels, torch.full((2, 6), 3.0)), causal_lm_loss(logits, labels)
    assert torch.allclose(a, b, rtol=1e-6), f"uniform-weight loss {float(a):.7f} vs unweighted {float(b):.7f}"


def test_router_jitter_only_perturbs_training_forward(reference):
    from ultrathink_torch import config_from_dict

    cfg = config_from_dict(reference("mixtral_window")[0].config.to_dict())
    torch.manual_seed(0)
    jittery = CausalLM(dataclasses.replace(cfg, router_jitter_noise=0.5))
    ids = token_batch(1, SEQ)
    with torch.no_grad():
        eval_a, eval_b = jittery.eval()(ids).logits, jittery(ids).logits
        train = jittery.train()(ids).logits
    assert torch.equal(eval_a, eval_b), "eval forward must be deterministic"
    assert float((train - eval_a).abs().max()) > 1e-3, "jitter 0.5 left the training forward unchanged"


def packed_row():
    """One row of three documents (5, 9 and 4 tokens; 9 is longer than every sliding window) as the JAX data
    pipeline packs them: segment ids 1, 2, 3 and positions restarting at 0 with each document."""
    docs = [token_batch(1, n, seed=n)[0] for n in (5, 9, 4)]
    segments = torch.cat([torch.full((len(d),), i + 1) for i, d in enumerate(docs)])[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    return docs, torch.cat(docs)[None], segments, positions


@pytest.mark.parametrize("name", list(VARIANTS))
def test_packed_row_logits_match_transformers_packed_sequences(name, reference, twin):
    """transformers reads packing from restarting position_ids (no attention mask); the twin from segment ids."""
    _, ids, segments, positions = packed_row()
    with torch.no_grad():
        ours = twin(name)(ids, position_ids=positions, segment_ids=segments).logits
        ref = reference(name)[0](ids, position_ids=positions, use_cache=False).logits
    assert_logits_close(ours, ref, f"{name}: packed row, twin vs transformers")


@pytest.mark.parametrize("name", ["llama_gqa_head_dim", "mixtral_window"])
def test_packed_documents_get_the_logits_they_get_alone(name, twin):
    docs, ids, segments, positions = packed_row()
    with torch.no_grad():
        packed = twin(name)(ids, position_ids=positions, segment_ids=segments).logits[0]
        alone = torch.cat([twin(name)(d[None]).logits[0] for d in docs])
    assert_logits_close(packed, alone, f"{name}: packed row vs each document alone")


def test_segment_ids_without_positions_are_refused(twin):
    _, ids, segments, _ = packed_row()
    with pytest.raises(ValueError, match="segment_ids .* need position_ids"):
        twin("llama_gqa_head_dim")(ids, segment_ids=segments)
