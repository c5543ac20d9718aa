"""AdamW helper: matrices decay, 1-D parameters (norm weights) do not."""

from __future__ import annotations

import torch

from ultrathink_torch import build_adamw, decay_mask


def test_decay_mask_excludes_norm_weights_and_includes_matrices(twin):
    mask = decay_mask(twin("qwen2_moe_shared_mixed"))
    assert mask["model.layers.0.input_layernorm.weight"] is False
    assert mask["model.norm.weight"] is False
    assert mask["model.embed_tokens.weight"] is True
    assert mask["model.layers.0.mlp.experts.0.gate_proj.weight"] is True
    assert mask["model.layers.0.mlp.shared_expert_gate.weight"] is True


def test_adamw_groups_cover_every_parameter_once_with_their_decay(twin):
    model = twin("mixtral_window")
    opt = build_adamw(model, lr=1e-3, weight_decay=0.1)
    decayed, plain = (set(map(id, g["params"])) for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert decayed | plain == {id(p) for p in model.parameters()} and not decayed & plain
    assert all(p.ndim == 1 for p in model.parameters() if id(p) in plain)


def test_zero_gradient_step_shrinks_only_decayed_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_adamw(model, lr=0.1, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["0.weight"], before["0.weight"] * (1 - 0.1 * 0.5)), "matrix was not decayed by lr*wd"
    for n in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(after[n], before[n]), f"{n} changed under a zero gradient: it must not be decayed"
