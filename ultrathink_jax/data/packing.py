"""Greedy packing of documents into fixed rows, with per-document segment ids, positions and loss weights.

Documents are tokenized once into a flat stream, each followed by EOS (the EOS belongs to the document it
ends). Row r is stream[r*T : r*T + T + 1]: consecutive rows share one boundary token, so every stream token
after the first is a target exactly once and nothing is padded except, for evaluation, the final partial row.
A document longer than a row simply continues in the next row.

Per row (T = seq_len), all int32 except `weights` (float32), shape [T]:
  inputs = row[:-1], targets = row[1:]
  segment_ids: 1, 2, ... for each document piece in the row, 0 for padding
  positions:   restart at 0 at the start of each segment in the row (a continued document restarts too)
  weights:     1 where target t is the next token of the same document (segment of token t == segment of
               token t+1 > 0), else 0 -- no loss across a document boundary or on padding. A stream with a
               `target_mask` (chat data: 1 on assistant tokens) also zeroes the weight of every target whose
               mask is 0, so only those tokens are learned.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from ultrathink_jax.data.errors import DataError

FIELDS = ("inputs", "targets", "segment_ids", "positions", "weights")


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """tokens: every document's ids + EOS, concatenated; doc_starts[i]: index of document i's first token;
    target_mask (optional, uint8 like tokens): 1 where the token may be a loss target."""
    tokens: np.ndarray
    doc_starts: np.ndarray
    target_mask: np.ndarray | None = None

    def __post_init__(self):
        if self.tokens.ndim != 1 or self.doc_starts.ndim != 1:
            raise DataError("token stream arrays must be 1-D")
        if len(self.doc_starts) and (self.doc_starts[0] != 0 or np.any(np.diff(self.doc_starts) <= 0)
                                     or self.doc_starts[-1] >= len(self.tokens)):
            raise DataError("token stream doc_starts must start at 0 and increase strictly within the stream")
        if self.target_mask is not None and self.target_mask.shape != self.tokens.shape:
            raise DataError("token stream target_mask must have one entry per token")

    @property
    def n_tokens(self) -> int:
        return int(len(self.tokens))

    @property
    def n_documents(self) -> int:
        return int(len(self.doc_starts))


def pack_documents(token_lists: Iterable[Iterable[int]], eos_id: int, vocab_size: int) -> TokenStream:
    """Concatenates documents (lists of ids), appending EOS to each. Stored as uint16 when the vocabulary fits
    (half the memory of int32 for vocabularies up to 65536)."""
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    pieces: list[np.ndarray] = []
    starts: list[int] = []
    total = 0
    for ids in token_lists:
        doc = np.fromiter((*ids, eos_id), dtype=np.int64)
        if doc.min() < 0 or doc.max() >= vocab_size:
            raise DataError(f"token id {int(doc.max()) if doc.max() >= vocab_size else int(doc.min())} "
                            f"is outside the vocabulary [0, {vocab_size})")
        starts.append(total)
        total += len(doc)
        pieces.append(doc.astype(dtype))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    return TokenStream(tokens, np.asarray(starts, dtype=np.int64))


def num_rows(n_tokens: int, seq_len: int, keep_partial: bool) -> int:
    """Rows of seq_len + 1 tokens with stride seq_len; keep_partial also counts a final short row (>= 2 tokens)."""
    if seq_len <= 0:
        raise DataError(f"seq_len={seq_len} must be positive")
    if n_tokens < 2:
        return 0
    full, rest = divmod(n_tokens - 1, seq_len)
    return full + (1 if keep_partial and rest else 0)


def pack_row(stream: TokenStream, row: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Row `row` of the packed stream as a dict of [seq_len] arrays (see module docstring)."""
    start = row * seq_len
    end = min(start + seq_len + 1, stream.n_tokens)
    if start < 0 or end - start < 2:
        raise DataError(f"row {row} is outside a stream of {stream.n_tokens} tokens (seq_len={seq_len})")
    n = end - start
    tokens = np.full(seq_len + 1, pad_id, dtype=np.int32)
    tokens[:n] = stream.tokens[start:end]
    doc = np.searchsorted(stream.doc_starts, np.arange(start, end), side="right")
    first = np.ones(n, dtype=bool)
    first[1:] = doc[1:] != doc[:-1]
    segments = np.zeros(seq_len + 1, dtype=np.int32)
    segments[:n] = np.cumsum(first)
    index = np.arange(n)
    positions = np.zeros(seq_len + 1, dtype=np.int32)
    positions[:n] = index - np.maximum.accumulate(np.where(first, index, 0))
    weights = (segments[:-1] == segments[1:]) & (segments[:-1] > 0)
    if stream.target_mask is not None:
        weights[:n - 1] &= stream.target_mask[start + 1:end].astype(bool)
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": segments[:-1],
        "positions": positions[:-1],
        "weights": weights.astype(np.float32),
    }


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """An all-padding row (weight 0) that fills a final partial batch during evaluation."""
    return {
        "inputs": np.full(seq_len, pad_id, np.int32),
        "targets": np.full(seq_len, pad_id, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
        "weights": np.zeros(seq_len, np.float32),
    }


def stack_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in FIELDS}
