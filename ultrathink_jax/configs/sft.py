"""Supervised fine-tuning (launch.sft) of an imported or trained run on chat jsonl.

    python -m launch.sft --config=configs/sft.py --init=RUN --data=train.jsonl [--eval_data=eval.jsonl] --workdir=SFT

The model and its tokenizer come from --init (posttrain.init_from); this file sets data, optimizer and LoRA. LoRA:
--config.posttrain.lora_rank=8 (targets, alpha, dropout in the posttrain section).
"""

from ultrathink_jax.configs import base
from ultrathink_jax.posttrain.config import section as posttrain_section


def get_config():
    config = base.get_config()
    config.posttrain = posttrain_section()
    config.data.seq_len = 512
    config.data.global_batch_size = 8
    config.train.steps = 200
    config.train.sample_tokens = 0
    config.optim.learning_rate = 2e-5
    config.optim.warmup_fraction = 0.05  # 10 of the 200 steps
    config.optim.weight_decay = 0.0
    config.checkpoint.every_steps = 100
    config.log.every_steps = 10
    return config
