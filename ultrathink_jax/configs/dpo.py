"""Direct Preference Optimization (launch.dpo) from an SFT (or any) run on preference-pair jsonl.

    python -m launch.dpo --config=configs/dpo.py --init=SFT --data=pairs.jsonl [--eval_data=held_out.jsonl] --workdir=DPO

data.global_batch_size counts pairs (each step runs 2x that many rows). The reference is the --init model.
"""

from ultrathink_jax.configs import sft


def get_config():
    config = sft.get_config()
    config.posttrain.dpo_beta = 0.1
    config.data.global_batch_size = 4
    config.train.steps = 100
    config.optim.learning_rate = 5e-6
    return config
