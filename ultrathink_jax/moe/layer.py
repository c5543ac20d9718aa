"""MoEMLP: a Mixture-of-SwiGLU-experts replacement for the dense MLP (Mixtral / Qwen2-MoE layout).

Parameter names map to Hugging Face tensors by transpose only:
  router/kernel [D, E]                      <- gate.weight [E, D]
  wi_gate, wi_up [E, D, F]; wo [E, F, D]    <- experts.gate_up_proj [E, 2F, D] halves / down_proj [E, D, F]
  shared_expert/{gate,up,down}_proj/kernel  <- shared_expert.{gate,up,down}_proj.weight (Qwen2-MoE)
  shared_expert_gate/kernel [D, 1]          <- shared_expert_gate.weight [1, D]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from ultrathink_jax.config import ModelConfig
from ultrathink_jax.moe import dispatch, router

ACTIVATION_FNS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def input_init(config: ModelConfig):
    # N(0, init_std) truncated at +-2 init_std (jax: stddev is that of the untruncated normal)
    return jax.nn.initializers.truncated_normal(config.init_std)


def output_init(config: ModelConfig):
    # residual-stream writers are scaled down so the residual variance does not grow with depth
    return jax.nn.initializers.truncated_normal(config.init_std / (2 * config.n_layers) ** 0.5)


class SharedExpert(nn.Module):
    """Qwen2-MoE's always-on SwiGLU expert (its own intermediate size)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda features, init, names, name: nn.Dense(  # noqa: E731
            features, use_bias=False, dtype=cfg.dtype, param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(init, names), name=name)
        act = ACTIVATION_FNS[cfg.activation]
        f = cfg.shared_expert_d_ff
        h = act(dense(f, input_init(cfg), ("embed", "mlp"), "gate_proj")(x)) * \
            dense(f, input_init(cfg), ("embed", "mlp"), "up_proj")(x)
        h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
        return dense(cfg.d_model, output_init(cfg), ("mlp", "embed"), "down_proj")(h)


class MoEMLP(nn.Module):
    """x [B, T, D], valid [B, T] (False = padding) -> (y [B, T, D], aux).

    aux (all float32, summable / stackable across layers):
      aux_loss           unweighted Switch load-balance loss of this layer (transformers' formula)
      z_loss             unweighted router z-loss of this layer
      expert_counts [E]  top-k assignments per expert over valid tokens, before dropping
      router_prob_sum [E] router probability mass per expert over valid tokens (for the pooled aux loss)
      dropped            valid assignments not computed (capacity dispatch only; 0 when dropless)
      router_entropy_sum sum over valid tokens of the router entropy, in NATS (stats.py converts to bits)
      n_valid            number of valid tokens
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
            kernel_init=nn.with_logical_partitioning(input_init(cfg), ("embed", None)), name="router",
        )(x.astype(jnp.float32))
        routing = router.route(logits, k, cfg.norm_topk_prob)

        def expert_param(name, init, shape, names):
            return self.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32).astype(cfg.dtype)

        wi_gate = expert_param("wi_gate", input_init(cfg), (n_experts, d, f), ("expert", "embed", "mlp"))
        wi_up = expert_param("wi_up", input_init(cfg), (n_experts, d, f), ("expert", "embed", "mlp"))
        wo = expert_param("wo", output_init(cfg), (n_experts, f, d), ("expert", "mlp", "embed"))
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
                            kernel_init=nn.with_logical_partitioning(input_init(cfg), ("embed", None)),
                            name="shared_expert_gate")(xc)
            y = y + jax.nn.sigmoid(gate) * SharedExpert(cfg, name="shared_expert")(xc)
        y = nn.with_logical_constraint(y, ("act_batch", "act_length", "act_embed"))

        counts = router.expert_counts(routing.expert_index, valid, n_experts)
        prob_sum = router.router_prob_sum(routing.probs, valid)
        n_valid = jnp.sum(valid.astype(jnp.float32))
        aux = {
            "aux_loss": router.load_balance_loss(counts, prob_sum, n_valid),
            "z_loss": router.z_loss(routing.logits, valid),
            "expert_counts": counts,
            "router_prob_sum": prob_sum,
            "dropped": dropped,
            "router_entropy_sum": router.entropy_sum(routing.probs, valid),
            "n_valid": n_valid,
        }
        return y, aux
