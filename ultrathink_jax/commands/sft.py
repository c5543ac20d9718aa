"""Supervised fine-tuning on conversations, loss on assistant tokens only:
`python -m launch.sft --config=configs/sft.py --init=RUN --data=FILE.jsonl [--eval_data=FILE.jsonl] --workdir=OUT
[--config.posttrain.lora_rank=8 ...]`.

--init is a run directory (launch.import_hf, launch.train, launch.sft, launch.dpo). Data lines are
{"messages": [{"role", "content"}, ...]} or {"prompt", "completion"}; the chat template is the tokenizer's own or
the ChatML default. Re-running with the same --workdir resumes.
"""

import sys

from ultrathink_jax.commands import posttrain_cli

PROG = "launch.sft"


def main(argv=None) -> int:
    return posttrain_cli.main(PROG, "sft", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
