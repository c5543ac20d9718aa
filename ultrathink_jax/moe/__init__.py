"""Mixture-of-Experts: router (Mixtral semantics), dropless / capacity dispatch, the MoEMLP layer, telemetry.

For the trainer:
  moe_loss(aux["moe"], config)    -> scalar to add to the LM loss (weighted load-balance + z-loss; the
                                     load-balance term is the mean per-layer Switch loss by default, or
                                     transformers' pooled aux_loss with router_aux_loss_per_layer=False)
  update_selection_bias(...)      -> aux-loss-free balancing: the train step moves each layer's selection bias
  moe_metrics(aux["moe"], config) -> {"moe/load_balance_factor": ..., "moe/layer_3/drop_fraction": ...}
  moe_report(aux["moe"], config)  -> end-of-run text: per-expert bar chart + per-layer lines
aux["moe"] may be summed over micro-batches / steps before moe_metrics / moe_report (they read only the
additive fields); moe_loss takes ONE micro-batch's aux.
"""

from ultrathink_jax.moe.layer import MoEMLP, inactive_expert_params
from ultrathink_jax.moe.router import moe_loss, update_selection_bias
from ultrathink_jax.moe.stats import format_expert_bars, moe_metrics, moe_report

__all__ = ["MoEMLP", "format_expert_bars", "inactive_expert_params", "moe_loss", "moe_metrics", "moe_report",
           "update_selection_bias"]
