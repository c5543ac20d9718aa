"""MoE presets: 8 experts top-2 in every layer of the seed sizes, with the dense preset's active parameters."""

import importlib

import pytest

from ultrathink_jax.config import ModelConfig
from ultrathink_jax.moe import inactive_expert_params
from ultrathink_jax.params import param_count

SIZES = ["tiny", "small", "medium", "large", "xl"]


def model_of(name: str) -> ModelConfig:
    fields = dict(importlib.import_module(f"ultrathink_jax.configs.{name}").get_config().model)
    fields["vocab_size"] = fields["vocab_size"] or 2048  # 0 = the tokenizer's size, resolved by the trainer
    return ModelConfig(**fields)


@pytest.mark.parametrize("size", SIZES)
def test_moe_preset_is_the_dense_shape_with_8_experts_top2_in_every_layer(size):
    moe, dense = model_of(f"moe_{size}"), model_of(size)
    assert (moe.n_experts, moe.n_experts_per_tok, moe.resolved_moe_d_ff) == (8, 2, dense.d_ff // 2)
    assert all(moe.is_moe_layer(i) for i in range(moe.n_layers))
    assert (moe.d_model, moe.n_layers, moe.n_heads, moe.vocab_size) == \
        (dense.d_model, dense.n_layers, dense.n_heads, dense.vocab_size)


@pytest.mark.parametrize("size", SIZES + ["default"])
def test_moe_preset_parameter_counts(size):
    moe, dense = model_of(f"moe_{size}"), model_of(size)
    n_moe = sum(moe.is_moe_layer(i) for i in range(moe.n_layers))
    expert = 3 * moe.d_model * moe.resolved_moe_d_ff
    dense_mlp = 3 * dense.d_model * dense.d_ff
    total, dense_total = param_count(moe), param_count(dense)
    # each MoE layer swaps one dense MLP for E experts plus a [D, E] router
    assert total == dense_total + n_moe * (moe.n_experts * expert + moe.d_model * moe.n_experts - dense_mlp), \
        (total, dense_total)
    active = total - inactive_expert_params(moe)
    assert active == dense_total + n_moe * moe.d_model * moe.n_experts, (active, dense_total)  # + routers only


def test_moe_default_is_small_enough_for_a_cpu_and_exports_as_mixtral_for_every_target():
    from ultrathink_jax.hf import family
    from ultrathink_jax.hf.gguf_export import gguf_refusal

    moe = model_of("moe_default")
    assert param_count(moe) < 20e6
    assert all(moe.is_moe_layer(i) for i in range(moe.n_layers))
    assert moe.router_aux_loss_per_layer, "every layer must balance, not only the pool"
    assert moe.router_aux_loss_weight == 0.1  # measured, see configs/base.moe_variant
    assert family(moe) == "mixtral" and gguf_refusal(moe) is None
