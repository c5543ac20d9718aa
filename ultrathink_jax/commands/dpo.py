"""Direct Preference Optimization: `python -m launch.dpo --config=configs/dpo.py --init=RUN --data=PAIRS.jsonl
[--eval_data=PAIRS.jsonl] --workdir=OUT [--config.posttrain.dpo_beta=0.1 --config.posttrain.lora_rank=8 ...]`.

Data lines are {"prompt": text or messages, "chosen": text, "rejected": text}. The frozen reference is the --init
model (with LoRA: the base with adapters off). Logs loss, rewards/margin, rewards/accuracy, logps/chosen|rejected.
"""

import sys

from ultrathink_jax.commands import posttrain_cli

PROG = "launch.dpo"


def main(argv=None) -> int:
    return posttrain_cli.main(PROG, "dpo", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
