"""Constitutional AI data from a model's own critiques and revisions:
`python -m launch.constitutional (--workdir=RUN | --hf_dir=DIR) --principles=FILE --prompts=FILE --out=DIR
[--templates=FILE] [--mode=revision|feedback] [--max_new_tokens=64]`.

Writes DIR/sft.jsonl (prompt + revision, for launch.sft), DIR/pairs.jsonl (for launch.dpo) and DIR/trace.jsonl.
--mode=revision prefers each revision over the first answer; --mode=feedback samples two answers and lets the
model pick the one that better follows a principle (the likelier of "(A)" / "(B)").
"""

import argparse
import sys
from pathlib import Path

from ultrathink_jax import cli

PROG = "launch.constitutional"
# the default critique/revision/comparison templates, package data (an installed copy has them too)
DEFAULT_TEMPLATES = Path(__file__).resolve().parents[1] / "assets" / "constitutional" / "templates.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_source(parser, "a run directory (launch.train / import_hf / sft / dpo)", step=False)
    parser.add_argument("--principles", required=True, help="jsonl of principles")
    parser.add_argument("--prompts", required=True, help="prompts: .txt (one per line) or .jsonl with 'prompt'")
    parser.add_argument("--templates", default=DEFAULT_TEMPLATES, help="critique/revision/comparison templates (default: the shipped ones)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--mode", default="revision", help="revision or feedback (how pairs are labelled)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def run() -> int:
        from pathlib import Path

        from ultrathink_jax.data import load_tokenizer
        from ultrathink_jax.posttrain import chat, constitutional
        from ultrathink_jax.posttrain.loop import load_model, resize_vocab
        from ultrathink_jax.train.config import VOCAB_MULTIPLE

        settings = constitutional.Settings(args.mode, args.max_new_tokens, args.temperature, args.seed)
        templates_file = Path(args.templates)
        principles = constitutional.read_principles(args.principles)
        prompts = constitutional.read_prompts(args.prompts)
        templates = constitutional.read_templates(templates_file)
        if args.workdir:
            model, params, tokenizer, _ = load_model(args.workdir)
        else:
            from ultrathink_jax.hf.load import load_hf

            model, params = load_hf(args.hf_dir)
            tokenizer = load_tokenizer(args.hf_dir)
        chat.ensure_chat_template(tokenizer)
        if tokenizer.vocab_size > model.vocab_size:
            params, model = resize_vocab(params, model, -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
        counts = constitutional.run(constitutional.Model(params, model, tokenizer, settings), principles, prompts,
                                    templates, args.out)
        print(f"{PROG}: wrote {args.out}/sft.jsonl ({counts['sft']}), pairs.jsonl ({counts['pairs']}), trace.jsonl"
              + (f"; {counts['truncated_prompts']} prompts cut to the model's context" if counts["truncated_prompts"] else ""))
        return 0

    return cli.run_main(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
