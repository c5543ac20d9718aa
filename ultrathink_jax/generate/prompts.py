"""Prompts from the command line: read, checked and encoded, with errors that count prompts from 1 as users do
(the engine's own checks count rows of the expanded batch from 0)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ultrathink_jax.generate.sampling import GenerationError


def read_prompts(prompts: Sequence[str], prompt_file: str | None = None) -> list[str]:
    """`prompts`, then one per non-blank line of `prompt_file`; at least one, none empty."""
    prompts = list(prompts)
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt_file {path} does not exist")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise GenerationError("no prompt given: pass --prompt TEXT or --prompt_file FILE")
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {i + 1} is empty")
    return prompts


def encode_prompts(tokenizer, texts: Sequence[str], max_seq_len: int) -> list[list[int]]:
    """Token ids of each prompt, each at least one token and leaving room for one new token in the context."""
    ids = tokenizer.encode_batch(list(texts))
    for i, p in enumerate(ids):
        if not p:
            raise GenerationError(f"prompt {i + 1} encodes to no tokens")
        if len(p) >= max_seq_len:
            raise GenerationError(f"prompt {i + 1} has {len(p)} tokens; the model's context is "
                                  f"max_seq_len={max_seq_len}, leaving no room for a new token")
    return ids
