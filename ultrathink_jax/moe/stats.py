"""MoE telemetry from the layers' aux dicts: host-side NumPy, called on `jax.device_get`-ed arrays.

Input: the aux dicts of the MoE layers, either stacked on a leading layer axis ({name: [L, ...]}) or a list
of per-layer dicts, optionally already summed over several steps (every field is a sum or a per-step loss).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

LN2 = math.log(2.0)


def _stack(aux: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    if isinstance(aux, Mapping):
        return {k: np.asarray(v, np.float64) for k, v in aux.items()}
    if not aux:
        raise ValueError("moe stats: no MoE layer aux dicts given")
    return {k: np.stack([np.asarray(layer[k], np.float64) for layer in aux]) for k in aux[0]}


def _summary(counts, dropped, entropy_sum, n_valid, aux_loss, z_loss) -> dict[str, Any]:
    n_experts = counts.shape[-1]
    total = counts.sum()
    share = counts / total if total > 0 else np.zeros_like(counts)
    nonzero = share[share > 0]
    return {
        "expert_share": share,  # fraction of routed assignments per expert; sums to 1
        "load_balance": float(share.mean() / share.max()) if total > 0 else 0.0,  # mean / max load, 1 = perfect
        "load_entropy_bits": float(-(nonzero * np.log2(nonzero)).sum()),  # max log2(E)
        "max_entropy_bits": math.log2(n_experts),
        "router_entropy_bits": float(entropy_sum / max(n_valid, 1.0) / LN2),  # mean per-token router entropy
        "aux_loss": float(aux_loss),
        "z_loss": float(z_loss),
        "drop_fraction": float(dropped / total) if total > 0 else 0.0,  # of valid top-k assignments
    }


def moe_stats(aux, layer_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """{"layers": {layer_id: summary}, "overall": summary}; layer ids default to 0..L-1 (pass the model's
    MoE layer indices to label them). The overall aux loss pools all layers as transformers does; the
    overall z-loss is the mean over layers."""
    a = _stack(aux)
    n_layers = a["expert_counts"].shape[0]
    layer_ids = list(range(n_layers)) if layer_ids is None else list(layer_ids)
    if len(layer_ids) != n_layers:
        raise ValueError(f"moe stats: {len(layer_ids)} layer ids for {n_layers} MoE layers")
    layers = {
        lid: _summary(a["expert_counts"][i], a["dropped"][i], a["router_entropy_sum"][i], a["n_valid"][i],
                      a["aux_loss"][i], a["z_loss"][i])
        for i, lid in enumerate(layer_ids)
    }
    counts, prob_sum, n_valid = a["expert_counts"].sum(0), a["router_prob_sum"].sum(0), a["n_valid"].sum()
    n = max(n_valid, 1.0)
    pooled_aux = counts.shape[-1] * float(np.sum((counts / n) * (prob_sum / n)))
    overall = _summary(counts, a["dropped"].sum(), a["router_entropy_sum"].sum(), n_valid, pooled_aux,
                       a["z_loss"].mean())
    return {"layers": layers, "overall": overall}


def scalars(stats: Mapping[str, Any], prefix: str = "moe") -> dict[str, float]:
    """Flat {tag: float} for TensorBoard: `moe/overall/load_balance`, `moe/layer3/expert_share/e5`, ..."""
    out: dict[str, float] = {}
    groups = [("overall", stats["overall"])] + [(f"layer{lid}", s) for lid, s in stats["layers"].items()]
    for name, summary in groups:
        for key, value in summary.items():
            if key == "max_entropy_bits":
                continue
            if key == "expert_share":
                for e, share in enumerate(value):
                    out[f"{prefix}/{name}/expert_share/e{e}"] = float(share)
            else:
                out[f"{prefix}/{name}/{key}"] = float(value)
    return out


def format_expert_bars(shares: Sequence[float], width: int = 40) -> str:
    """The end-of-run bar chart: one line per expert, then the load-balance factor and routing entropy.
    Bars are scaled so the busiest expert gets `width` blocks."""
    shares = np.asarray(shares, np.float64)
    if shares.ndim != 1 or shares.size == 0:
        raise ValueError(f"format_expert_bars: expected a non-empty 1-D list of shares, got shape {shares.shape}")
    total = shares.sum()
    if total <= 0 or (shares < 0).any():
        raise ValueError(f"format_expert_bars: shares must be >= 0 with a positive sum, got {shares.tolist()}")
    shares = shares / total
    n = shares.size
    digits = len(str(n - 1))
    lines = [f"Expert {e:>{digits}}: {100 * s:.1f}% {'█' * round(width * s / shares.max())}"
             for e, s in enumerate(shares)]
    nonzero = shares[shares > 0]
    entropy = float(-(nonzero * np.log2(nonzero)).sum())
    lines.append(f"Load Balance Factor: {shares.mean() / shares.max():.2f}")
    lines.append(f"Routing Entropy: {entropy:.2f} bits (max: {math.log2(n):.1f} for {n} experts)")
    return "\n".join(lines)
