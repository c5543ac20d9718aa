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
from pathlib import Path
from typing import Sequence, TextIO

from launch import common

PROG = "launch.generate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a launch.train run directory")
    source.add_argument("--hf_dir", help="a Hugging Face model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of --workdir (default: latest)")
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
    parser.add_argument("--early_exit_measure", default="max_prob", help="max_prob or margin (top-1 minus top-2)")
    parser.add_argument("--speculative_draft_layers", type=int, default=0,
                        help="self-speculative decoding: draft with this many layers (default 0: off)")
    parser.add_argument("--speculative_k", type=int, default=4, help="draft tokens per verification")
    parser.add_argument("--mesh", default="", help="device mesh as axis=size pairs, e.g. tensor=2,fsdp=4 "
                                                   "(default: the first device)")
    return parser


class OrderedStream:
    """Writes rows' text in row order while they are generated: the current row live, later rows buffered until
    every row before them is done. Incomplete UTF-8 (a trailing U+FFFD) is held back until its bytes arrive."""

    def __init__(self, tokenizer, headers: list[str], prompts: list[str], budgets: list[int], eos_id: int,
                 out: TextIO):
        self.tokenizer, self.headers, self.prompts, self.budgets, self.eos_id = tokenizer, headers, prompts, budgets, eos_id
        self.out = out
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.current, self.written = 0, 0  # row being written live; characters of its completion already out
        self._start_row()

    def __call__(self, row: int, token: int) -> None:
        self.tokens[row].append(token)
        while self.current < len(self.prompts):
            self._write_new_text(final=self._done(self.current))
            if not self._done(self.current):
                return
            self.current += 1
            self._start_row()

    def finish(self) -> None:
        while self.current < len(self.prompts):
            self._write_new_text(final=True)
            self.current += 1
            self._start_row()

    def _done(self, row: int) -> bool:
        tokens = self.tokens[row]
        return len(tokens) >= self.budgets[row] or (bool(tokens) and tokens[-1] == self.eos_id)

    def _start_row(self) -> None:
        if self.current > 0:
            self.out.write("\n")
        if self.current < len(self.prompts):
            if self.headers[self.current]:
                self.out.write(self.headers[self.current] + "\n")
            self.out.write(self.prompts[self.current])
            self.written = 0
        self.out.flush()

    def _write_new_text(self, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens[self.current], skip_special_tokens=True)
        if not final:
            text = text.rstrip("\ufffd")
        if len(text) > self.written:
            self.out.write(text[self.written:])
            self.written = len(text)
            self.out.flush()


def read_prompts(args) -> list[str]:
    from ultrathink_jax.generate import GenerationError

    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt_file {path} does not exist")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise GenerationError("no prompt given: pass --prompt TEXT or --prompt_file FILE")
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {i + 1} is empty")
    return prompts


def parse_mesh(text: str):
    import jax

    from ultrathink_jax import sharding

    if not text:
        return sharding.make_mesh({}, jax.devices()[:1])
    sizes = {}
    for part in text.split(","):
        axis, sep, size = part.partition("=")
        if not sep or not size.lstrip("-").isdigit():
            raise sharding.MeshError(f"--mesh: {part!r} is not axis=size (e.g. tensor=2,fsdp=4)")
        sizes[axis.strip()] = int(size)
    return sharding.make_mesh(sizes)


def load_model(args, mesh):
    """(ModelConfig, params, tokenizer) from --workdir or --hf_dir."""
    from ultrathink_jax.data import load_tokenizer

    if args.workdir:
        from ultrathink_jax.train import load_run

        run = load_run(args.workdir, args.step, mesh)
        return run.model_config, run.params, run.tokenizer
    from ultrathink_jax.hf import load_hf

    config, params = load_hf(args.hf_dir)
    return config, params, load_tokenizer(args.hf_dir)


def generate_text(args, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> list[list[int]]:
    """Runs one batch and streams it to `out`; returns the generated token ids per sample."""
    from ultrathink_jax.generate import Engine, GenerationError, SamplingConfig
    from ultrathink_jax.generate.engine import token_budget

    if args.num_samples < 1:
        raise GenerationError(f"--num_samples={args.num_samples} must be >= 1")
    if args.max_new_tokens < 1:
        raise GenerationError(f"--max_new_tokens={args.max_new_tokens} must be >= 1")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    texts = read_prompts(args)
    mesh = parse_mesh(args.mesh)
    config, params, tokenizer = load_model(args, mesh)
    rows = [(i, s, text) for i, text in enumerate(texts) for s in range(args.num_samples)]
    ids = tokenizer.encode_batch([text for _, _, text in rows])
    for (i, _, _), p in zip(rows, ids):
        if not p:
            raise GenerationError(f"prompt {i + 1} encodes to no tokens")
        if len(p) >= config.max_seq_len:
            raise GenerationError(f"prompt {i + 1} has {len(p)} tokens; the model's context is "
                                  f"max_seq_len={config.max_seq_len}, leaving no room for a new token")
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
    from ultrathink_jax.generate.early_exit import EarlyExitConfig, EarlyExitEngine
    from ultrathink_jax.generate.speculative import SpeculativeConfig, SpeculativeEngine

    if args.early_exit_threshold is not None and args.speculative_draft_layers:
        raise GenerationError("--early_exit_threshold and --speculative_draft_layers are alternatives; pass one")
    if args.early_exit_threshold is not None:
        return EarlyExitEngine(engine, EarlyExitConfig(args.early_exit_threshold, args.early_exit_measure))
    if args.speculative_draft_layers:  # a bad value is reported by SpeculativeConfig.check
        return SpeculativeEngine(engine, SpeculativeConfig(args.speculative_draft_layers, args.speculative_k))
    return None


def describe_stats(stats) -> str:
    if hasattr(stats, "acceptance_rate"):
        return (f"; speculative: acceptance rate {stats.acceptance_rate:.1%}, "
                f"{stats.tokens_per_round:.2f} tokens per verification")
    return (f"; early exit: mean exit depth {stats.mean_depth:.2f} of {stats.n_layers} layers, "
            f"{stats.layer_flops_saved:.1%} of layer FLOPs saved")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        from ultrathink_jax.generate import GenerationError
        from ultrathink_jax.hf import HFFormatError

        try:
            generate_text(args)
        except (GenerationError, HFFormatError) as e:
            print(f"{PROG}: error: {common.one_line(e)}", file=sys.stderr)
            return 2
        return 0

    return common.run_main(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
