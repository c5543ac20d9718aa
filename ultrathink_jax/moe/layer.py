"""MoEMLP: a Mixture-of-SwiGLU-experts replacement for the dense MLP (Mixtral / Qwen2-MoE layout).

Parameter names map to Hugging Face tensors by transpose only:
  router/kernel [D, E]                      <- gate.weight [E, D]
  wi_gate, wi_up [E, D, F]; wo [E, F, D]    <- experts.gate_up_proj [E, 2F, D] halves / down_proj [E, D, F]
  shared_expert/{gate,up,down}_proj/kernel  <- shared_expert.{gate,up,down}_proj.weight (Qwen2-MoE)
  shared_expert_gate/kernel [D, 1]          <- shared_expert_gate.weight [1, D]
  selection_bias [E]                        (aux-loss-free balancing only; no Hugging Face counterpart)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from ultrathink_jax.activations import ACTIVATION_FNS
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.layers.init import residual_out_init, weight_init
from ultrathink_jax.layers.mlp import MLP
from ultrathink_jax.moe import dispatch, router


class MoEMLP(nn.Module):
    """x [B, T, D], valid [B, T] (False = padding) -> (y [B, T, D], aux).

    aux (all float32, stackable across layers). The sums are additive over layers, micro-batches and steps;
    the two per-layer losses are values for this batch (`moe_loss` / `moe_metrics` use only the sums):
      expert_counts [E]   sum: top-k assignments per expert over valid tokens, before dropping
      router_prob_sum [E] sum: router probability mass per expert over valid tokens
      n_valid             sum: number of valid tokens
      dropped             sum: valid assignments not computed (capacity dispatch; always 0 when dropless)
      router_entropy_sum  sum: per-token router entropy over valid tokens, in NATS (stats converts to bits)
      z_loss_sum          sum: logsumexp(router logits)^2 over valid tokens
      aux_loss            value: this layer's unweighted Switch load-balance loss (transformers' formula)
      z_loss              value: this layer's unweighted router z-loss (z_loss_sum / n_valid)
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, valid, deterministic: bool = True):
        cfg = self.config
        n_experts, k, d, f = cfg.n_experts, cfg.n_experts_per_tok, cfg.d_model, cfg.resolved_moe_d_ff
        if cfg.router_jitter > 0 and not deterministic:
            # Mixtral scales the whole block input in place, so the experts see the jittered input too
            noise = jax.random.uniform(self.make_rng("jitter"), x.shape, jnp.float32,
                                       1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
            x = (x * noise).astype(x.dtype)

        logits = nn.Dense(
            n_experts, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
            precision=jax.lax.Precision.HIGHEST,  # no TF32 / bf16 passes: routing must match the export
            kernel_init=nn.with_logical_partitioning(weight_init(cfg), ("embed", None)), name="router",
        )(x.astype(jnp.float32))
        bias = None
        if cfg.router_bias_update_rate > 0:  # aux-loss-free balancing; updated by the train step, not by gradients
            bias = self.param(router.SELECTION_BIAS, nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                              (n_experts,), jnp.float32)
        routing = router.route(logits, k, cfg.norm_topk_prob, bias)

        def expert_param(name, init, shape, names):
            return self.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32).astype(cfg.dtype)

        wi_gate = expert_param("wi_gate", weight_init(cfg), (n_experts, d, f), ("expert", "embed", "mlp"))
        wi_up = expert_param("wi_up", weight_init(cfg), (n_experts, d, f), ("expert", "embed", "mlp"))
        wo = expert_param("wo", residual_out_init(cfg), (n_experts, f, d), ("expert", "mlp", "embed"))
        act = ACTIVATION_FNS[cfg.activation]
        xc = x.astype(cfg.dtype)
        if cfg.moe_dispatch == "dropless":
            y, dropped = dispatch.dropless(xc, routing.expert_index, routing.expert_weight, valid,
                                           wi_gate, wi_up, wo, act)
        else:
            y, dropped = dispatch.capacity(xc, routing.expert_index, routing.expert_weight, valid,
                                           wi_gate, wi_up, wo, act, cfg.capacity_factor)

        if cfg.shared_expert_d_ff > 0:
            gate = nn.Dense(1, use_bias=False, dtype=cfg.dtype, param_dtype=jnp.float32,
                            kernel_init=nn.with_logical_partitioning(weight_init(cfg), ("embed", None)),
                            name="shared_expert_gate")(xc)
            y = y + jax.nn.sigmoid(gate) * MLP(cfg, cfg.shared_expert_d_ff, name="shared_expert")(xc)
        y = nn.with_logical_constraint(y, ("act_batch", "act_length", "act_embed"))

        counts = router.expert_counts(routing.expert_index, valid, n_experts)
        prob_sum = router.router_prob_sum(routing.probs, valid)
        n_valid = jnp.sum(valid.astype(jnp.float32))
        z_loss = router.z_loss(routing.logits, valid)
        aux = {
            "aux_loss": router.load_balance_loss(counts, prob_sum, n_valid),
            "z_loss": z_loss,
            "z_loss_sum": z_loss * n_valid,
            "expert_counts": counts,
            "router_prob_sum": prob_sum,
            "dropped": dropped,
            "router_entropy_sum": router.entropy_sum(routing.probs, valid),
            "n_valid": n_valid,
        }
        return y, aux


def inactive_expert_params(config: ModelConfig) -> int:
    """Expert parameters a token does NOT use: per MoE layer, the (E - k) unchosen experts' SwiGLU weights.
    Active parameters per token = `params.param_count(config)` minus this."""
    n_moe = sum(config.is_moe_layer(i) for i in range(config.n_layers))
    per_expert = 3 * config.d_model * config.resolved_moe_d_ff
    return n_moe * (config.n_experts - config.n_experts_per_tok) * per_expert
