"""Mixture-of-Experts: router (Mixtral semantics), dropless / capacity dispatch, the MoEMLP layer, telemetry."""

from ultrathink_jax.moe.layer import MoEMLP
from ultrathink_jax.moe.router import pooled_router_losses

__all__ = ["MoEMLP", "pooled_router_losses"]
