"""The trainer's config sections (`train`, `optim`, `checkpoint`, `eval`, `log`): defaults and validation."""

from __future__ import annotations

import math

import ml_collections

from ultrathink_jax.checkpoint import ON_ERROR
from ultrathink_jax.config import ConfigError

SCHEDULES = ("cosine", "linear", "constant")
VOCAB_MULTIPLE = 64  # model.vocab_size = 0 -> tokenizer vocabulary rounded up to this (aligned matmuls)


def sections() -> dict[str, ml_collections.ConfigDict]:
    train = ml_collections.ConfigDict({
        "steps": 100_000,  # optimizer steps in total (a resumed run continues up to this)
        "seed": 0,  # parameter init and router-jitter RNG (the data order has its own data.seed)
        "grad_accum": 1,  # micro-batches per step: data.global_batch_size rows are split into this many
        "z_loss_weight": 0.0,  # PaLM z-loss on the output logits (0 = off)
        # The training loss applies the head chunk by chunk of the sequence (losses.head_cross_entropy), each chunk's
        # float32 logits at most this many MiB; 0 = auto: 4 on CPU (a chunk that stays in cache), else no chunking
        "logits_chunk_mib": 0.0,
        # Each micro-batch's loss as this many independent groups of rows in one program (same gradient): XLA:CPU
        # overlaps them over its cores; 0 = auto (train.steps.resolve_row_groups: on one CPU device, one group per
        # core, two for dropless MoE, at most 4; 1 with router jitter or LayerSkip or off CPU)
        "row_groups": 0,
        "max_bad_steps": 5,  # stop after this many consecutive steps skipped for a non-finite loss or gradient
        "sample_tokens": 64,  # tokens generated at the end of training (0 = no sample)
        "sample_prompt": "def ",
        "sample_temperature": 0.8,  # 0 = greedy
        # LayerSkip (train/layerskip.py); off unless exits or layer dropout are set
        "early_exit_layers": "",  # comma-separated layer indices (0-based, before the last layer), e.g. "1,3"
        "early_exit_scale": 1.0,  # exit l's cross-entropy weighs scale * (l + 1) / n_layers
        "early_exit_schedule": "rotate",  # all | rotate (one exit per step) | curriculum (deepest exit first)
        "early_exit_curriculum_steps": 0,  # curriculum: step at which every exit is active
        "layer_dropout_max": 0.0,  # skip rate of the last layer; grows linearly from 0 at the first layer
    })
    optim = ml_collections.ConfigDict({
        "learning_rate": 3e-4,  # peak
        "schedule": "cosine",  # after linear warmup: cosine or linear decay to min_lr_ratio * peak, or constant
        # linear warmup: warmup_steps if >= 0 (0 = none), else warmup_fraction of train.steps, so overriding
        # train.steps keeps the recipe's proportion
        "warmup_steps": -1,
        "warmup_fraction": 0.02,
        "min_lr_ratio": 0.1,
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,
        "weight_decay": 0.1,  # decoupled (AdamW); never applied to norm scales or biases
        "grad_clip": 1.0,  # global-norm clipping (0 = off)
    })
    checkpoint = ml_collections.ConfigDict({
        "every_steps": 1000,  # also saved at the end of the run
        "max_to_keep": 3,
        "async_save": True,  # write in a background thread while training continues
        "on_error": "stop",  # a failing save (disk full, ...): "stop" the run, or "continue" with a logged error
    })
    evaluation = ml_collections.ConfigDict({
        "every_steps": 500,  # held-out loss every N steps and at the end (0 = only at the end)
        "max_batches": 0,  # cap per evaluation (0 = the whole held-out set)
    })
    log = ml_collections.ConfigDict({
        "every_steps": 10,  # console + TensorBoard scalars
        "tensorboard": True,  # event files in <workdir>/tensorboard
        "progress": True,  # console progress bar
        "peak_tflops": 0.0,  # per-device peak for MFU; 0 = known accelerator table, else a measured matmul peak
    })
    return {"train": train, "optim": optim, "checkpoint": checkpoint, "eval": evaluation, "log": log}


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first unknown section/field or unusable value."""
    defaults = sections()
    for name, section in defaults.items():
        if name not in config:
            raise ConfigError(f"config: missing section {name!r}")
        unknown = sorted(set(config[name].keys()) - set(section.keys()))
        if unknown:
            raise ConfigError(f"config: unknown field(s) {unknown} in section {name!r}; known: {sorted(section)}")
    t, o, c, e, l = (config[n] for n in ("train", "optim", "checkpoint", "eval", "log"))
    checks = [
        ("train.steps", t.steps, t.steps > 0, "must be positive"),
        ("train.grad_accum", t.grad_accum, t.grad_accum > 0, "must be positive"),
        ("train.z_loss_weight", t.z_loss_weight, t.z_loss_weight >= 0, "must be >= 0"),
        ("train.logits_chunk_mib", t.logits_chunk_mib, t.logits_chunk_mib >= 0, "must be >= 0 (0 = auto)"),
        ("train.row_groups", t.row_groups, t.row_groups >= 0, "must be >= 0 (0 = auto)"),
        ("train.max_bad_steps", t.max_bad_steps, t.max_bad_steps > 0, "must be positive"),
        ("train.sample_tokens", t.sample_tokens, t.sample_tokens >= 0, "must be >= 0"),
        ("train.sample_temperature", t.sample_temperature, t.sample_temperature >= 0, "must be >= 0"),
        ("optim.learning_rate", o.learning_rate, o.learning_rate > 0, "must be positive"),
        ("optim.schedule", o.schedule, o.schedule in SCHEDULES, f"must be one of {SCHEDULES}"),
        ("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= -1, "must be >= 0, or -1 = warmup_fraction"),
        ("optim.warmup_fraction", o.warmup_fraction, 0 <= o.warmup_fraction < 1, "must be in [0, 1)"),
        ("optim.min_lr_ratio", o.min_lr_ratio, 0 <= o.min_lr_ratio <= 1, "must be in [0, 1]"),
        ("optim.b1", o.b1, 0 <= o.b1 < 1, "must be in [0, 1)"),
        ("optim.b2", o.b2, 0 <= o.b2 < 1, "must be in [0, 1)"),
        ("optim.eps", o.eps, o.eps > 0, "must be positive"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, "must be >= 0"),
        ("optim.grad_clip", o.grad_clip, o.grad_clip >= 0, "must be >= 0 (0 = off)"),
        ("checkpoint.every_steps", c.every_steps, c.every_steps > 0, "must be positive"),
        ("checkpoint.max_to_keep", c.max_to_keep, c.max_to_keep > 0, "must be positive"),
        ("checkpoint.on_error", c.on_error, c.on_error in ON_ERROR, f"must be one of {ON_ERROR}"),
        ("eval.every_steps", e.every_steps, e.every_steps >= 0, "must be >= 0 (0 = only at the end)"),
        ("eval.max_batches", e.max_batches, e.max_batches >= 0, "must be >= 0 (0 = all)"),
        ("log.every_steps", l.every_steps, l.every_steps > 0, "must be positive"),
        ("log.peak_tflops", l.peak_tflops, l.peak_tflops >= 0 and math.isfinite(l.peak_tflops), "must be >= 0"),
    ]
    for name, value, ok, why in checks:
        if not ok:
            raise ConfigError(f"config: {name}={value!r} {why}")
    warmup = warmup_steps(o, t.steps)
    if warmup >= t.steps:
        given = (f"optim.warmup_steps={o.warmup_steps}" if o.warmup_steps >= 0 else
                 f"optim.warmup_fraction={o.warmup_fraction} gives {warmup} warmup steps, which")
        raise ConfigError(f"config: {given} must be < train.steps={t.steps} (the whole run would be warmup)")
    from ultrathink_jax.train.layerskip import from_train_config

    from_train_config(t, config.model.n_layers)  # the LayerSkip fields' own checks
    if config.data.global_batch_size % t.grad_accum:
        raise ConfigError(f"config: data.global_batch_size={config.data.global_batch_size} must be divisible by "
                          f"train.grad_accum={t.grad_accum}")
    if t.row_groups and (config.data.global_batch_size // t.grad_accum) % t.row_groups:
        raise ConfigError(f"config: train.row_groups={t.row_groups} must divide the micro-batch's "
                          f"{config.data.global_batch_size // t.grad_accum} rows (data.global_batch_size / "
                          f"train.grad_accum)")


def warmup_steps(optim: ml_collections.ConfigDict, total_steps: int) -> int:
    """The schedule's warmup length: optim.warmup_steps, or -1 = warmup_fraction of `total_steps`."""
    if optim.warmup_steps >= 0:
        return optim.warmup_steps
    return round(optim.warmup_fraction * total_steps)
