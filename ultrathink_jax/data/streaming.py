"""Training batches streamed from a Hugging Face `IterableDataset`, never materialising the corpus.

Documents are read lazily in small chunks, tokenized with `encode_batch`, followed by EOS and appended to a
token carry. Rows are cut from the carry exactly like the in-memory path (`packing.pack_row`): seq_len + 1
tokens with stride seq_len, so consecutive rows share one token and every token after the first is a target
exactly once. Rows then pass through a seeded shuffle buffer of `shuffle_buffer_rows` rows (1 = stream order),
are grouped into global batches, and this process keeps its slice (every process reads the whole stream).

When the stream ends (or `max_chars` is reached) the next epoch reopens it from the start; the carry flows on,
so no token is dropped at the seam, and the shuffle buffer's RNG keeps going, so epochs mix differently.

State (JSON): epoch, source rows consumed this epoch (reopened with `IterableDataset.skip`), characters read
this epoch, the carry, the shuffle buffer rows and the RNG state. Memory is bounded by the buffer plus one
chunk of documents.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from ultrathink_jax.data.errors import DataError
from ultrathink_jax.data.packing import TokenStream, pack_row, stack_rows
from ultrathink_jax.data.sources import HFSource
from ultrathink_jax.data.tokenizer import Tokenizer

_STATE_KIND = "hf-stream"
_STATE_VERSION = 1
_CHUNK_DOCS = 64  # documents per encode_batch call ...
_CHUNK_CHARS = 1 << 16  # ... or fewer, once this many characters are gathered (bounds the carry)


class StreamingTrainIterator:
    """Same interface as `TrainIterator`: endless dicts of [global_batch_size / process_count, seq_len] arrays,
    a JSON-serialisable `get_state()` and `set_state()` that resumes with the very next batch. `stats` counts
    what has been read so far (`epoch`, `documents`, `chars`, `tokens`; the first chunk is read on
    construction); `n_rows` is None (unknown for a stream)."""

    n_rows = None

    def __init__(self, source: HFSource, tokenizer: Tokenizer, cfg: ml_collections.ConfigDict,
                 process_index: int | None = None, process_count: int | None = None):
        from ultrathink_jax.data.pipeline import _process_slice  # pipeline imports this module

        if not source.streaming:
            raise DataError(f"{source.describe()}: the streaming iterator needs streaming=True")
        self.source, self.tokenizer = source, tokenizer
        self.seq_len, self.global_batch_size = cfg.seq_len, cfg.global_batch_size
        self.buffer_rows, self.seed = cfg.shuffle_buffer_rows, cfg.seed
        self._offset, self.local_batch_size = _process_slice(cfg.global_batch_size, process_index, process_count)
        # Identifies the data order; resuming with other data or settings would silently change the batches.
        self._fingerprint = {"source": source.fingerprint(), "tokenizer_eos": tokenizer.eos_id,
                             "vocab_size": tokenizer.vocab_size, "seq_len": cfg.seq_len,
                             "global_batch_size": cfg.global_batch_size, "seed": cfg.seed,
                             "shuffle_buffer_rows": cfg.shuffle_buffer_rows}
        self.stats = {"streaming": True, "epoch": 0, "documents": 0, "chars": 0, "tokens": 0}
        self._reset(epoch=0, docs=0, chars=0, carry=np.zeros(0, np.int32), starts=[], buffer=[],
                    rng=np.random.default_rng(cfg.seed))
        # Read the first chunk now: a missing dataset, column or text fails before training starts, and
        # `stats` reports real numbers from the start.
        self._fill_carry()

    def _reset(self, epoch, docs, chars, carry, starts, buffer, rng):
        self._epoch, self._docs, self._chars = epoch, docs, chars
        self._carry, self._starts = carry, starts  # tokens not yet cut into rows; document starts in them
        self._buffer = buffer  # shuffle buffer: (row tokens [seq_len + 1], document starts in the row)
        self._rng = rng
        self._rows = None  # the open document iterator

    # ------------------------------------------------------------------------------------------- documents

    def _open(self) -> None:
        ds = self.source.load()
        if ds.column_names is not None:
            ds = ds.select_columns([self.source.text_column])
        if self._docs:
            ds = ds.skip(self._docs)
        self._rows = iter(ds)

    def _read_chunk(self) -> list[str]:
        """Up to one chunk of documents from the stream; [] at the end of the epoch (stream or max_chars)."""
        if self._rows is None:
            self._open()
        chunk, size = [], 0
        cap = self.source.max_chars
        while len(chunk) < _CHUNK_DOCS and size < _CHUNK_CHARS and not (cap and self._chars >= cap):
            row = next(self._rows, None)
            if row is None:
                break
            self._docs += 1  # source rows, empty ones too: that is what skip() counts on resume
            value = row.get(self.source.text_column)
            if value is None or value == "":
                continue
            if not isinstance(value, str):
                raise DataError(f"{self.source.describe()}: column {self.source.text_column!r} holds "
                                f"{type(value).__name__}, expected strings")
            chunk.append(value)
            size += len(value)
            self._chars += len(value)
        return chunk

    def _fill_carry(self) -> None:
        """Appends documents until the carry holds a full row (seq_len + 1 tokens), across epochs."""
        empty_epochs = 0
        while len(self._carry) < self.seq_len + 1:
            chunk = self._read_chunk()
            if not chunk:
                if self._docs == 0 or empty_epochs:
                    raise DataError(f"no text found in {self.source.describe()}")
                empty_epochs += 1
                self._epoch, self._docs, self._chars, self._rows = self._epoch + 1, 0, 0, None
                self.stats["epoch"] = self._epoch
                continue
            empty_epochs = 0
            pieces, starts, total = [self._carry], list(self._starts), len(self._carry)
            for ids in self.tokenizer.encode_batch(chunk):
                doc = np.asarray([*ids, self.tokenizer.eos_id], dtype=np.int32)
                starts.append(total)
                total += len(doc)
                pieces.append(doc)
            self._carry, self._starts = np.concatenate(pieces), starts
            self.stats["documents"] += len(chunk)
            self.stats["chars"] += sum(len(d) for d in chunk)
            self.stats["tokens"] += total - len(pieces[0])

    # ------------------------------------------------------------------------------------------- rows

    def _next_stream_row(self) -> tuple[np.ndarray, list[int]]:
        """The next seq_len + 1 tokens of the stream and its document starts; the carry keeps the last token."""
        self._fill_carry()
        t = self.seq_len
        row = self._carry[:t + 1]
        row_starts = [0] + [s for s in self._starts if 0 < s <= t]
        self._starts = [0] + [s - t for s in self._starts if s > t]
        self._carry = self._carry[t:]
        return row, row_starts

    def _next_row(self) -> tuple[np.ndarray, list[int]]:
        while len(self._buffer) < self.buffer_rows:
            self._buffer.append(self._next_stream_row())
        i = int(self._rng.integers(len(self._buffer)))
        out = self._buffer[i]
        self._buffer[i] = self._buffer[-1]
        self._buffer.pop()
        return out

    def __iter__(self) -> "StreamingTrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._next_row() for _ in range(self.global_batch_size)]
        mine = rows[self._offset:self._offset + self.local_batch_size]
        return stack_rows([pack_row(TokenStream(tokens, np.asarray(starts, np.int64)), 0, self.seq_len,
                                    self.tokenizer.pad_id) for tokens, starts in mine])

    # ------------------------------------------------------------------------------------------- state

    def get_state(self) -> dict:
        rng = self._rng.bit_generator.state
        return {
            "version": _STATE_VERSION, "kind": _STATE_KIND, "data": dict(self._fingerprint),
            "epoch": self._epoch, "documents": self._docs, "chars": self._chars,
            "carry": self._carry.tolist(), "carry_starts": list(self._starts),
            "buffer": [[tokens.tolist(), list(starts)] for tokens, starts in self._buffer],
            # PCG64's 128-bit integers as strings: JSON readers elsewhere may not keep them exact.
            "rng": {"state": str(rng["state"]["state"]), "inc": str(rng["state"]["inc"]),
                    "has_uint32": rng["has_uint32"], "uinteger": rng["uinteger"]},
            "stats": dict(self.stats),
        }

    def set_state(self, state: dict) -> None:
        if (not isinstance(state, dict) or state.get("version") != _STATE_VERSION
                or state.get("kind") != _STATE_KIND):
            raise DataError(f"data iterator state is not a version-{_STATE_VERSION} {_STATE_KIND} state "
                            f"(keys: {sorted(state) if isinstance(state, dict) else type(state).__name__})")
        if state.get("data") != self._fingerprint:
            raise DataError(f"data iterator state was saved for different data {state.get('data')}, "
                            f"this run has {self._fingerprint}")
        rng = np.random.default_rng()
        r = state["rng"]
        rng.bit_generator.state = {"bit_generator": "PCG64",
                                   "state": {"state": int(r["state"]), "inc": int(r["inc"])},
                                   "has_uint32": r["has_uint32"], "uinteger": r["uinteger"]}
        self._reset(epoch=state["epoch"], docs=state["documents"], chars=state["chars"],
                    carry=np.asarray(state["carry"], np.int32), starts=list(state["carry_starts"]),
                    buffer=[(np.asarray(tokens, np.int32), list(starts)) for tokens, starts in state["buffer"]],
                    rng=rng)
        self.stats = dict(state["stats"])
