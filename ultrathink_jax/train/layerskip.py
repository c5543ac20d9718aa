"""LayerSkip training (Elhoushi et al. 2024): early-exit losses through the shared head, and layer dropout.

Exit loss: at each *active* exit layer l the hidden state goes through the final norm and the LM head (the model's
own, so the weights stay a plain Llama/Mixtral) and its cross-entropy is added with weight
`scale * (l + 1) / n_layers` (deeper exits weigh more, as in the paper). Which exits are active at step s:
  all        every exit, every step;
  rotate     one exit per step, exits[s % E] (one extra head per step: the cheap schedule);
  curriculum the deepest exit from step 0, then shallower ones join evenly until every exit is on at
             `curriculum_steps`.
Layer dropout: layer i of row b is skipped with probability p_max * i / (n_layers - 1) (0 at the first layer,
p_max at the last), drawn from the step's RNG, so a resumed run skips the same layers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ultrathink_jax.config import ConfigError, ModelConfig
from ultrathink_jax.model import layer_plan

SCHEDULES = ("all", "rotate", "curriculum")


@dataclasses.dataclass(frozen=True)
class LayerSkipConfig:
    exit_layers: tuple[int, ...] = ()  # sorted, each < n_layers - 1 (the last layer is the model's own output)
    scale: float = 1.0
    schedule: str = "rotate"
    curriculum_steps: int = 0
    layer_dropout_max: float = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.exit_layers) or self.layer_dropout_max > 0


def parse_layers(text: str, n_layers: int) -> tuple[int, ...]:
    """"1,3" -> (1, 3); every layer must be an exit the model can take before its last layer."""
    try:
        layers = sorted({int(p) for p in str(text).split(",") if p.strip()})
    except ValueError:
        raise ConfigError(f"config: train.early_exit_layers={text!r} must be comma-separated layer indices") from None
    bad = [l for l in layers if not 0 <= l < n_layers - 1]
    if bad:
        raise ConfigError(f"config: train.early_exit_layers={text!r} has layer {bad[0]} outside "
                          f"[0, n_layers - 1 = {n_layers - 1}) (the last layer is the model's own output)")
    return tuple(layers)


def from_train_config(train, n_layers: int) -> LayerSkipConfig | None:
    """The `train` section's LayerSkip fields, or None when LayerSkip is off (the step is then unchanged)."""
    cfg = LayerSkipConfig(parse_layers(train.early_exit_layers, n_layers), float(train.early_exit_scale),
                          train.early_exit_schedule, int(train.early_exit_curriculum_steps),
                          float(train.layer_dropout_max))
    checks = [
        ("early_exit_scale", cfg.scale, cfg.scale > 0, "must be positive"),
        ("early_exit_schedule", cfg.schedule, cfg.schedule in SCHEDULES, f"must be one of {SCHEDULES}"),
        ("early_exit_curriculum_steps", cfg.curriculum_steps, cfg.curriculum_steps >= 0, "must be >= 0"),
        ("early_exit_curriculum_steps", cfg.curriculum_steps,
         cfg.schedule != "curriculum" or not cfg.exit_layers or cfg.curriculum_steps > 0,
         "must be positive with early_exit_schedule='curriculum'"),
        ("layer_dropout_max", cfg.layer_dropout_max, 0 <= cfg.layer_dropout_max < 1, "must be in [0, 1)"),
    ]
    for name, value, ok, why in checks:
        if not ok:
            raise ConfigError(f"config: train.{name}={value!r} {why}")
    return cfg if cfg.enabled else None


def active_exits(cfg: LayerSkipConfig, step):
    """(layer indices int32 [E'], on float32 [E'], slot int32 [E']) for this step; `slot` is each one's place in
    cfg.exit_layers (for per-exit metrics). E' = 1 for `rotate`, E for the others (`on` masks curriculum exits)."""
    layers = jnp.asarray(cfg.exit_layers, jnp.int32)
    n = len(cfg.exit_layers)
    if cfg.schedule == "rotate":
        slot = (step % n)[None].astype(jnp.int32)
        return layers[slot], jnp.ones((1,), jnp.float32), slot
    slot = jnp.arange(n, dtype=jnp.int32)
    if cfg.schedule == "all":
        return layers, jnp.ones((n,), jnp.float32), slot
    start = np.asarray([cfg.curriculum_steps * (n - 1 - r) / n for r in range(n)], np.float32)  # deepest first
    return layers, (step >= start).astype(jnp.float32), slot


def exit_weights(cfg: LayerSkipConfig, model: ModelConfig, layers, on):
    return cfg.scale * (layers.astype(jnp.float32) + 1) / model.n_layers * on


def dropout_rates(cfg: LayerSkipConfig, model: ModelConfig) -> np.ndarray:
    L = model.n_layers
    return cfg.layer_dropout_max * np.arange(L) / max(L - 1, 1)


def layer_keep(cfg: LayerSkipConfig, model: ModelConfig, rng, batch: int):
    """{stage name: bool [n_units, n_blocks, B]} for the model's `layer_keep`, or None without layer dropout."""
    if cfg.layer_dropout_max == 0:
        return None
    keep = jax.random.uniform(jax.random.fold_in(rng, 0x1A7E), (model.n_layers, batch)) >= \
        jnp.asarray(dropout_rates(cfg, model))[:, None]
    out = {}
    for stage in layer_plan(model):
        n = stage.n_units * len(stage.unit)
        out[stage.name] = keep[stage.first_layer:stage.first_layer + n].reshape(stage.n_units, len(stage.unit), batch)
    return out


def model_inputs(cfg: LayerSkipConfig, model: ModelConfig, rng, step, batch: int) -> dict:
    """Keyword arguments for `Transformer.__call__`: the step's layer-dropout mask and active exits."""
    out = {"layer_keep": layer_keep(cfg, model, rng, batch)}
    if cfg.exit_layers:
        out["exits"] = active_exits(cfg, step)[0]
    return out


def add_exit_losses(cfg: LayerSkipConfig, model: ModelConfig, aux, batch, step, objective, parts):
    """objective + the weighted exit cross-entropies (sums, like the main loss); parts gains per-exit
    `exit_ce_sum` / `exit_weight_sum` [E] (zero for exits inactive this step)."""
    if not cfg.exit_layers:
        return objective, parts
    from ultrathink_jax import losses

    layers, on, slot = active_exits(cfg, step)
    weights = exit_weights(cfg, model, layers, on)
    n = len(cfg.exit_layers)
    ce_sum, weight_sum = jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32)
    for e in range(layers.shape[0]):
        ce, w = losses.cross_entropy(aux["exit_logits"][e], batch["targets"], batch["weights"])
        objective = objective + weights[e] * ce
        ce_sum = ce_sum.at[slot[e]].add(ce * on[e])
        weight_sum = weight_sum.at[slot[e]].add(w * on[e])
    return objective, {**parts, "exit_ce_sum": ce_sum, "exit_weight_sum": weight_sum}


def exit_scalars(metrics) -> dict[str, float]:
    """TensorBoard scalars of a step's exit losses: `train/exit_loss_layer<l>` for the exits active that step."""
    return {f"train/exit_loss_layer{int(l)}": float(v)
            for l, v, n in zip(metrics["exit_layers"], metrics["exit_loss"], metrics["exit_tokens"]) if n > 0}
