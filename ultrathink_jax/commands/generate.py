"""Samples text: `python -m launch.generate (--workdir=RUN [--step=N] | --hf_dir=DIR) --prompt "..." [options]`.

--hf_dir loads an exported or third-party llama / mixtral / qwen2_moe directory (safetensors + tokenizer).
Several prompts (repeated --prompt, or --prompt_file with one prompt per line) and --num_samples run as one batch.
Text streams to stdout as it is produced: the first sample live, each later one flushed as soon as the samples
before it are done, then continued live. A row stops at the tokenizer's EOS token or the length limit.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence, TextIO

from ultrathink_jax import cli

PROG = "launch.generate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_source(parser)
    parser.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch")
    parser.add_argument("--prompt_file", help="a text file with one prompt per line (blank lines skipped)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="0 = off")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1 = off")
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="CTRL penalty; 1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    parser.add_argument("--early_exit_threshold", type=float, default=None,
                        help="CALM early exit: a token leaves after the first layer whose confidence reaches this "
                             "(in (0, 1]; default: off)")
    parser.add_argument("--early_exit_measure", default="max_prob",
                        help="max_prob, margin (top-1 minus top-2 probability) or saturation (cosine of a layer's "
                             "input and output: no head matmul per check)")
    parser.add_argument("--early_exit_layers", default="",
                        help="comma-separated layers (0-based) after which a token may exit (default: every layer "
                             "before the last)")
    parser.add_argument("--speculative_draft_layers", type=int, default=0,
                        help="self-speculative decoding: draft with this many layers (default 0: off)")
    parser.add_argument("--speculative_k", type=int, default=4, help="draft tokens per verification")
    cli.add_mesh_flag(parser, "--workdir: the run's mesh section; --hf_dir: the first device")
    return parser


def load_model(args):
    """(ModelConfig, params, tokenizer, mesh) from --workdir or --hf_dir, on --mesh or the source's default mesh."""
    from ultrathink_jax import sharding
    from ultrathink_jax.data import load_tokenizer

    mesh = cli.mesh_from_flag(args.mesh)
    if args.workdir:
        from ultrathink_jax.train import load_run
        from ultrathink_jax.train.run import load_config, run_mesh

        mesh = mesh or run_mesh(load_config(args.workdir))
        run = load_run(args.workdir, args.step, mesh)
        return run.model_config, run.params, run.tokenizer, mesh
    import jax

    from ultrathink_jax.hf import load_hf

    config, params = load_hf(args.hf_dir)
    return config, params, load_tokenizer(args.hf_dir), mesh or sharding.make_mesh({}, jax.devices()[:1])


def generate_text(args, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> list[list[int]]:
    """Runs one batch and streams it to `out`; returns the generated token ids per sample."""
    from ultrathink_jax.generate import Engine, GenerationError, SamplingConfig
    from ultrathink_jax.generate.engine import token_budget
    from ultrathink_jax.generate.prompts import encode_prompts, read_prompts
    from ultrathink_jax.generate.stream import OrderedStream

    if args.num_samples < 1:
        raise GenerationError(f"--num_samples={args.num_samples} must be >= 1")
    if args.max_new_tokens < 1:
        raise GenerationError(f"--max_new_tokens={args.max_new_tokens} must be >= 1")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    texts = read_prompts(args.prompt, args.prompt_file)
    config, params, tokenizer, mesh = load_model(args)
    prompt_ids = encode_prompts(tokenizer, texts, config.max_seq_len)
    rows = [(i, s, text) for i, text in enumerate(texts) for s in range(args.num_samples)]
    ids = [prompt_ids[i] for i, _, _ in rows]
    several = len(rows) > 1
    headers = [f"=== prompt {i + 1}" + (f", sample {s + 1}" if args.num_samples > 1 else "") + " ==="
               if several else "" for i, s, _ in rows]
    stream = OrderedStream(tokenizer, headers, [t for _, _, t in rows],
                           [token_budget(config, len(p), args.max_new_tokens) for p in ids], tokenizer.eos_id, out)
    engine = Engine(params, config, mesh)
    adaptive = adaptive_engine(args, engine)
    start = time.perf_counter()
    if adaptive is None:
        tokens = engine.generate(ids, args.max_new_tokens, sampling, tokenizer.eos_id, args.seed, on_token=stream)
        report = ""
    else:  # decodes on device to the end, then prints
        tokens, stats = adaptive.generate(ids, args.max_new_tokens, sampling, tokenizer.eos_id, args.seed)
        for r, row in enumerate(tokens):
            for t in row:
                stream(r, t)
        report = describe_stats(stats)
    stream.finish()
    seconds = time.perf_counter() - start
    n = sum(map(len, tokens))
    err.write(f"{PROG}: {n} tokens in {len(rows)} sample(s), {seconds:.2f} s ({n / seconds:.1f} tokens/s, "
              f"compilation included){report}\n")
    return tokens


def adaptive_engine(args, engine):
    """The early-exit or self-speculative decoder the flags ask for, or None for plain decoding."""
    from ultrathink_jax.generate import GenerationError
    from ultrathink_jax.generate.early_exit import EarlyExitConfig, EarlyExitEngine, parse_layers
    from ultrathink_jax.generate.speculative import SpeculativeConfig, SpeculativeEngine

    if args.early_exit_threshold is not None and args.speculative_draft_layers:
        raise GenerationError("--early_exit_threshold and --speculative_draft_layers are alternatives; pass one")
    if args.early_exit_threshold is not None:
        return EarlyExitEngine(engine, EarlyExitConfig(args.early_exit_threshold, args.early_exit_measure,
                                                       parse_layers(args.early_exit_layers)))
    if args.speculative_draft_layers:  # a bad value is reported by SpeculativeConfig.check
        return SpeculativeEngine(engine, SpeculativeConfig(args.speculative_draft_layers, args.speculative_k))
    return None


def describe_stats(stats) -> str:
    if hasattr(stats, "acceptance_rate"):
        return (f"; speculative: acceptance rate {stats.acceptance_rate:.1%}, "
                f"{stats.tokens_per_round:.2f} tokens per verification")
    return (f"; early exit: mean exit depth {stats.mean_depth:.2f} of {stats.n_layers} layers, "
            f"{stats.layer_flops_saved:.1%} of layer FLOPs saved, {stats.net_flops_saved:.1%} net of the "
            f"confidence checks")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_model_source(parser, args)

    def run() -> int:
        generate_text(args)
        return 0

    return cli.run_main(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
