"""The `posttrain` config section (launch.sft / launch.dpo): where to start, LoRA, DPO's beta."""

from __future__ import annotations

import ml_collections

from ultrathink_jax.config import ConfigError


def section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "init_from": "",  # the run to start from (its latest checkpoint): launch.import_hf / train / sft / dpo
        "lora_rank": 0,  # 0 = full fine-tuning; > 0 = LoRA adapters of this rank, base weights frozen
        "lora_alpha": 16.0,  # adapter output scaled by alpha / rank
        "lora_dropout": 0.0,  # dropout on the adapters' input while training
        "lora_targets": "q,v",  # comma-separated: q, k, v, o, gate, up, down
        "dpo_beta": 0.1,  # DPO: strength of the implicit KL penalty to the reference
    })


def validate(config: ml_collections.ConfigDict) -> None:
    if "posttrain" not in config:
        raise ConfigError("config: missing section 'posttrain' (see configs/sft.py)")
    p = config.posttrain
    unknown = sorted(set(p.keys()) - set(section().keys()))
    if unknown:
        raise ConfigError(f"config: unknown field(s) {unknown} in section 'posttrain'; known: {sorted(section())}")
    if not p.init_from:
        raise ConfigError("config: posttrain.init_from is empty; pass --init=RUN (a run to fine-tune)")
    if p.lora_rank < 0:
        raise ConfigError(f"config: posttrain.lora_rank={p.lora_rank} must be >= 0 (0 = full fine-tuning)")
    if p.dpo_beta <= 0:
        raise ConfigError(f"config: posttrain.dpo_beta={p.dpo_beta} must be positive")
    if config.train.grad_accum != 1:
        raise ConfigError(f"config: train.grad_accum={config.train.grad_accum}: post-training steps take whole "
                          "batches (set 1 and size data.global_batch_size instead)")
    if not config.data.train_files:
        raise ConfigError("config: data.train_files is empty; pass --data=FILE.jsonl")
