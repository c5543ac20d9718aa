"""MoE telemetry: share, balance, entropies, drop fraction from additive aux sums; the bar chart."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultrathink_jax.config import ModelConfig
from ultrathink_jax.moe import format_expert_bars, moe_metrics, moe_report
from ultrathink_jax.moe.stats import moe_summaries


def aux(counts, n_valid, dropped=(0.0, 0.0), entropy=(0.0, 0.0), z_sum=(0.0, 0.0)):
    counts = jnp.asarray(counts, jnp.float32)
    return {"expert_counts": counts, "router_prob_sum": counts / 2, "n_valid": jnp.asarray(n_valid, jnp.float32),
            "dropped": jnp.asarray(dropped, jnp.float32), "router_entropy_sum": jnp.asarray(entropy, jnp.float32),
            "z_loss_sum": jnp.asarray(z_sum, jnp.float32)}


def test_per_layer_and_overall_statistics():
    # 2 layers, 4 experts, 10 tokens each, top-2 -> 20 assignments per layer
    a = aux([[5, 5, 5, 5], [10, 6, 4, 0]], [10, 10], dropped=[0, 4], entropy=[10 * math.log(2), 0], z_sum=[3, 5])
    per_layer, overall = moe_summaries(a)
    np.testing.assert_allclose(per_layer["expert_share"][1], [0.5, 0.3, 0.2, 0.0], atol=1e-6)
    np.testing.assert_allclose(per_layer["load_balance_factor"], [1.0, 0.25 / 0.5], atol=1e-6)
    np.testing.assert_allclose(per_layer["load_entropy_bits"][0], 2.0, atol=1e-6)
    np.testing.assert_allclose(per_layer["router_entropy_bits"], [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(per_layer["drop_fraction"], [0.0, 0.2], atol=1e-6)
    np.testing.assert_allclose(per_layer["z_loss"], [0.3, 0.5], atol=1e-6)
    np.testing.assert_allclose(overall["expert_share"], [15 / 40, 11 / 40, 9 / 40, 5 / 40], atol=1e-6)
    np.testing.assert_allclose(overall["drop_fraction"], 4 / 40, atol=1e-6)
    np.testing.assert_allclose(overall["z_loss"], 8 / 20, atol=1e-6)


def test_statistics_of_summed_aux_equal_statistics_of_pooled_tokens():
    a1 = aux([[4, 2, 2, 0]], [4])
    a2 = aux([[0, 2, 2, 4]], [4])
    summed = jax.tree.map(lambda x, y: x + y, a1, a2)
    _, overall = moe_summaries(summed)
    assert float(overall["load_balance_factor"]) == pytest.approx(1.0), overall  # 4 per expert when pooled


def test_metrics_are_flat_and_named_by_model_layer():
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=4, n_heads=2, n_kv_heads=2, d_ff=32, n_experts=4,
                      moe_every=2)
    m = moe_metrics(aux([[5, 5, 5, 5], [10, 6, 4, 0]], [10, 10]), cfg)
    assert {"moe/load_balance_factor", "moe/expert_share/e3", "moe/layer_1/drop_fraction",
            "moe/layer_3/router_entropy_bits", "moe/aux_loss", "moe/z_loss"} <= set(m), sorted(m)
    assert all(jnp.ndim(v) == 0 for v in m.values())
    assert float(m["moe/layer_3/load_balance_factor"]) == pytest.approx(0.5)


def test_metrics_reject_a_config_with_a_different_number_of_moe_layers():
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=4, n_heads=2, n_kv_heads=2, d_ff=32, n_experts=4)
    with pytest.raises(ValueError, match="2 MoE layers but the config places 4"):
        moe_metrics(aux([[5, 5, 5, 5], [10, 6, 4, 0]], [10, 10]), cfg)


def test_bar_chart_matches_the_original_format():
    text = format_expert_bars([0.25, 0.25, 0.125, 0.375], width=6)
    assert text.splitlines() == [
        "Expert 0: 25.0% ████",
        "Expert 1: 25.0% ████",
        "Expert 2: 12.5% ██",
        "Expert 3: 37.5% ██████",
        "Load Balance Factor: 0.67",
        "Routing Entropy: 1.91 bits (max: 2.0 for 4 experts)",
    ], text


def test_bar_chart_rejects_empty_or_negative_shares():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        format_expert_bars([])
    with pytest.raises(ValueError, match="positive sum"):
        format_expert_bars([0.5, -0.1])


def test_report_has_the_bar_chart_and_one_line_per_layer():
    text = moe_report(aux([[5, 5, 5, 5], [10, 6, 4, 0]], [10, 10], dropped=[0, 4]))
    assert "Expert 3: 12.5%" in text and "Load Balance Factor: 0.67" in text, text
    assert "layer 1: balance 0.50" in text and "dropped 20.00%" in text, text
