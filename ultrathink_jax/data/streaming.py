"""Training batches streamed from a Hugging Face `IterableDataset`, never materialising the corpus.

Each process reads only its own part of the stream (`datasets.distributed.split_dataset_by_node`: whole
shards of the dataset when their number divides evenly, else every n-th example) and builds its own
[global_batch_size / process_count] rows per step. Documents are read lazily in small chunks, tokenized with
`encode_batch`, followed by EOS and appended to a token carry. Rows are cut from the carry exactly like the
in-memory path (`packing.pack_row`): seq_len + 1 tokens with stride seq_len, so consecutive rows share one
token and every token after the first is a target exactly once. Rows are shuffled in blocks of
`shuffle_buffer_rows` (a seeded permutation per block; 1 = stream order).

When the stream ends (or `max_chars` is reached) the next epoch reopens it from the start; the carry flows on,
so no token is dropped at the seam.

State (JSON, a few integers and at most seq_len tokens, whatever the buffer size): where the current block
began -- epoch, source rows and characters read this epoch before the chunk that feeds the block's first row,
the <= seq_len carried tokens (and document starts) from before that chunk, rows already cut from that chunk
before the block, and rows of the block already emitted -- plus the read statistics. A resume reopens the
stream there (`IterableDataset.skip`), re-reads at most one chunk and one block, and continues with the very
next row. Several processes: every process's state, gathered, so each resumes its own part.
"""

from __future__ import annotations

import json

import ml_collections
import numpy as np

from ultrathink_jax.data.batch_slice import process_slice
from ultrathink_jax.data.errors import DataError
from ultrathink_jax.data.packing import TokenStream, pack_row, stack_rows
from ultrathink_jax.data.sources import HFSource
from ultrathink_jax.data.tokenizer import Tokenizer

_STATE_KIND = "hf-stream"
_STATE_VERSION = 2
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
        if not source.streaming:
            raise DataError(f"{source.describe()}: the streaming iterator needs streaming=True")
        self.source, self.tokenizer = source, tokenizer
        self.seq_len, self.global_batch_size = cfg.seq_len, cfg.global_batch_size
        self.buffer_rows, self.seed = cfg.shuffle_buffer_rows, cfg.seed
        self._offset, self.local_batch_size = process_slice(cfg.global_batch_size, process_index, process_count)
        self.process_index = self._offset // self.local_batch_size
        self.process_count = cfg.global_batch_size // self.local_batch_size
        self._gather = process_count is None  # jax's own processes: checkpoint states are gathered
        # Identifies the data order; resuming with other data or settings would silently change the batches.
        self._fingerprint = {"source": source.fingerprint(), "tokenizer_eos": tokenizer.eos_id,
                             "vocab_size": tokenizer.vocab_size, "seq_len": cfg.seq_len,
                             "global_batch_size": cfg.global_batch_size, "seed": cfg.seed,
                             "shuffle_buffer_rows": cfg.shuffle_buffer_rows, "processes": self.process_count}
        self.stats = {"streaming": True, "epoch": 0, "documents": 0, "chars": 0, "tokens": 0}
        self._reset(epoch=0, docs=0, chars=0, carry=np.zeros(0, np.int32), starts=[])
        # Read the first chunk now: a missing dataset, column or text fails before training starts, and
        # `stats` reports real numbers from the start.
        self._fill_carry()

    def _reset(self, epoch, docs, chars, carry, starts, block=0):
        self._epoch, self._docs, self._chars = epoch, docs, chars
        self._carry, self._starts = carry, starts  # tokens not yet cut into rows; document starts in them
        self._rows = None  # the open document iterator
        # Where the carry's newest chunk was read from: (epoch, docs, chars, carry before it, its starts).
        self._origin = (epoch, docs, chars, carry.tolist(), list(starts))
        self._cut_since_origin = 0  # rows cut from the carry since that chunk was appended
        self._block, self._block_rows, self._emitted = block, [], 0
        self._block_start: dict | None = None

    # ------------------------------------------------------------------------------------------- documents

    def _open(self) -> None:
        ds = self.source.load()
        if ds.column_names is not None:
            ds = ds.select_columns([self.source.text_column])
        if self.process_count > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=self.process_index, world_size=self.process_count)
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
            origin = (self._epoch, self._docs, self._chars, self._carry.tolist(), list(self._starts))
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
            self._origin, self._cut_since_origin = origin, 0
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
        self._cut_since_origin += 1
        return row, row_starts

    def _next_row(self) -> tuple[np.ndarray, list[int]]:
        if self._emitted == len(self._block_rows):  # a new block: remember how to get back to its start
            self._block_start = {"epoch": self._origin[0], "documents": self._origin[1], "chars": self._origin[2],
                                 "carry": self._origin[3], "carry_starts": self._origin[4],
                                 "rows_cut": self._cut_since_origin, "block": self._block + 1}
            self._block += 1
            rows = [self._next_stream_row() for _ in range(self.buffer_rows)]
            order = np.random.default_rng([self.seed, self.process_index, self._block]).permutation(len(rows))
            self._block_rows, self._emitted = [rows[i] for i in order], 0
        self._emitted += 1
        return self._block_rows[self._emitted - 1]

    def __iter__(self) -> "StreamingTrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        mine = [self._next_row() for _ in range(self.local_batch_size)]  # from this process's own stream
        return stack_rows([pack_row(TokenStream(tokens, np.asarray(starts, np.int64)), 0, self.seq_len,
                                    self.tokenizer.pad_id) for tokens, starts in mine])

    # ------------------------------------------------------------------------------------------- state

    def _own_state(self) -> dict:
        return {"version": _STATE_VERSION, "kind": _STATE_KIND, "data": dict(self._fingerprint),
                "block_start": self._block_start, "emitted": self._emitted, "stats": dict(self.stats)}

    def get_state(self) -> dict:
        own = self._own_state()
        if not self._gather or self.process_count == 1:
            return own
        from jax.experimental import multihost_utils  # every process saves; orbax writes process 0's copy

        data = np.frombuffer(json.dumps(own).encode(), np.uint8)
        size = int(np.max(multihost_utils.process_allgather(np.array([len(data)]))))
        padded = np.zeros(size, np.uint8)
        padded[:len(data)] = data
        gathered = multihost_utils.process_allgather(padded)
        return {"version": _STATE_VERSION, "kind": _STATE_KIND, "data": dict(self._fingerprint),
                "processes": [json.loads(bytes(row).rstrip(b"\0").decode()) for row in gathered]}

    def set_state(self, state: dict) -> None:
        if (not isinstance(state, dict) or state.get("version") != _STATE_VERSION
                or state.get("kind") != _STATE_KIND):
            raise DataError(f"data iterator state is not a version-{_STATE_VERSION} {_STATE_KIND} state "
                            f"(keys: {sorted(state) if isinstance(state, dict) else type(state).__name__})")
        if state.get("data") != self._fingerprint:
            raise DataError(f"data iterator state was saved for different data {state.get('data')}, "
                            f"this run has {self._fingerprint}")
        if "processes" in state:
            state = state["processes"][self.process_index]
        start = state["block_start"]
        if start is None:  # saved before the first row
            return
        self._reset(epoch=start["epoch"], docs=start["documents"], chars=start["chars"],
                    carry=np.asarray(start["carry"], np.int32), starts=list(start["carry_starts"]),
                    block=start["block"] - 1)
        self._fill_carry()  # re-reads the chunk the block began in
        for _ in range(start["rows_cut"]):
            self._next_stream_row()
        for _ in range(state["emitted"]):
            self._next_row()
        self.stats = dict(state["stats"])
