"""MoE telemetry from the model's aux["moe"] (per-layer arrays stacked on a leading [n_moe_layers] axis).

Only the additive fields are used (expert_counts, router_prob_sum, n_valid, dropped, router_entropy_sum,
z_loss_sum), so aux summed over micro-batches or over logging steps gives the exact statistics of the pooled
tokens. Written with jnp: works inside or outside jit.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from ultrathink_jax.moe import router

STAT_NAMES = ("load_balance_factor", "load_entropy_bits", "router_entropy_bits", "aux_loss", "z_loss",
              "drop_fraction")


def _summary(counts, prob_sum, n_valid, dropped, entropy_sum, z_sum) -> dict:
    """Stats of one group of tokens; inputs are sums over that group ([E] or scalars)."""
    total = jnp.sum(counts)
    share = counts / jnp.maximum(total, 1.0)  # fraction of routed (top-k) assignments per expert; sums to 1
    safe = jnp.where(share > 0, share, 1.0)
    n = jnp.maximum(n_valid, 1.0)
    return {
        "expert_share": share,
        "load_balance_factor": jnp.mean(share) / jnp.maximum(jnp.max(share), 1e-12),  # mean/max load; 1 = even
        "load_entropy_bits": -jnp.sum(share * jnp.log2(safe)),  # of the load distribution; max log2(E)
        "router_entropy_bits": entropy_sum / n / math.log(2.0),  # mean per-token router entropy
        "aux_loss": router.load_balance_loss(counts, prob_sum, n_valid),  # transformers' value, unweighted
        "z_loss": z_sum / n,
        "drop_fraction": dropped / jnp.maximum(total, 1.0),  # of valid top-k assignments
    }


def moe_summaries(aux_moe: Mapping) -> tuple[dict, dict]:
    """(per_layer, overall): per_layer fields have a leading layer axis; overall pools every layer's tokens
    (its aux_loss is transformers' multi-layer aux_loss, its z_loss the mean over layers)."""
    a = {k: jnp.asarray(aux_moe[k], jnp.float32) for k in
         ("expert_counts", "router_prob_sum", "n_valid", "dropped", "router_entropy_sum", "z_loss_sum")}
    if a["expert_counts"].ndim != 2:
        raise ValueError(f"moe stats: expert_counts must be [n_moe_layers, E], got shape {a['expert_counts'].shape}")
    per_layer = {k: jnp.stack([_summary(*(a[f][i] for f in a))[k] for i in range(a["expert_counts"].shape[0])])
                 for k in ("expert_share",) + STAT_NAMES}
    overall = _summary(*(jnp.sum(a[f], axis=0) for f in a))
    return per_layer, overall


def moe_layer_ids(config, n_moe_layers: int) -> list[int]:
    """Model layer index of each stacked MoE entry (0..L-1 without a config)."""
    if config is None:
        return list(range(n_moe_layers))
    ids = [i for i in range(config.n_layers) if config.is_moe_layer(i)]
    if len(ids) != n_moe_layers:
        raise ValueError(f"moe stats: aux has {n_moe_layers} MoE layers but the config places {len(ids)}")
    return ids


def moe_metrics(aux_moe: Mapping, config=None) -> dict:
    """Flat {name: scalar} for TensorBoard: `moe/load_balance_factor`, `moe/expert_share/e3`,
    `moe/layer_3/drop_fraction`, ... (layer numbers are model layer indices when `config` is given)."""
    per_layer, overall = moe_summaries(aux_moe)
    out = {f"moe/{k}": overall[k] for k in STAT_NAMES}
    out.update({f"moe/expert_share/e{e}": s for e, s in enumerate(overall["expert_share"])})
    for i, lid in enumerate(moe_layer_ids(config, per_layer["expert_share"].shape[0])):
        out.update({f"moe/layer_{lid}/{k}": per_layer[k][i] for k in STAT_NAMES})
    return out


def format_expert_bars(shares: Sequence[float], width: int = 40) -> str:
    """The original's bar chart: one line per expert (the busiest gets `width` blocks), then the load-balance
    factor and the routing (load) entropy."""
    shares = np.asarray(shares, np.float64)
    if shares.ndim != 1 or shares.size == 0:
        raise ValueError(f"format_expert_bars: expected a non-empty 1-D list of shares, got shape {shares.shape}")
    if shares.sum() <= 0 or (shares < 0).any():
        raise ValueError(f"format_expert_bars: shares must be >= 0 with a positive sum, got {shares.tolist()}")
    shares = shares / shares.sum()
    n = shares.size
    digits = len(str(n - 1))
    lines = [f"Expert {e:>{digits}}: {100 * s:.1f}% {'█' * round(width * s / shares.max())}"
             for e, s in enumerate(shares)]
    nonzero = shares[shares > 0]
    entropy = float(-(nonzero * np.log2(nonzero)).sum())
    lines.append(f"Load Balance Factor: {shares.mean() / shares.max():.2f}")
    lines.append(f"Routing Entropy: {entropy:.2f} bits (max: {math.log2(n):.1f} for {n} experts)")
    return "\n".join(lines)


def moe_report(aux_moe: Mapping, config=None) -> str:
    """End-of-run summary: the overall per-expert bar chart, then one line per MoE layer."""
    per_layer, overall = moe_summaries(aux_moe)
    lines = ["Expert utilisation (all MoE layers):", format_expert_bars(np.asarray(overall["expert_share"])),
             f"Router entropy: {float(overall['router_entropy_bits']):.2f} bits/token, "
             f"aux loss {float(overall['aux_loss']):.4f}, z loss {float(overall['z_loss']):.4f}, "
             f"dropped {100 * float(overall['drop_fraction']):.2f}%"]
    for i, lid in enumerate(moe_layer_ids(config, per_layer["expert_share"].shape[0])):
        lines.append(f"  layer {lid}: balance {float(per_layer['load_balance_factor'][i]):.2f}, "
                     f"load entropy {float(per_layer['load_entropy_bits'][i]):.2f} bits, "
                     f"router entropy {float(per_layer['router_entropy_bits'][i]):.2f} bits, "
                     f"dropped {100 * float(per_layer['drop_fraction'][i]):.2f}%")
    return "\n".join(lines)
