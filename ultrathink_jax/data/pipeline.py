"""Entry points: tokenizer, training iterator and evaluation batches, built from `config.data`.

Training text is tokenized once into token shards (`shards.py`: a prepared dataset, or one made lazily in the
workdir's cache); evaluation text into one in-memory stream (cached too). The grain graph then works on row
indices only: seeded shuffle (new permutation each epoch) -> repeat -> [mix of several datasets by weight] ->
batch of global row indices -> this process's slice -> packed rows read from the memory-mapped shards, built by `read_threads` threads `prefetch_buffer_size`
batches ahead. Its state is one integer, so a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import grain
import ml_collections
import numpy as np

from ultrathink_jax import atomic
from ultrathink_jax.data import config as data_config
from ultrathink_jax.data.batch_slice import process_slice
from ultrathink_jax.data.errors import DataError
from ultrathink_jax.data.packing import TokenStream, empty_row, num_rows, pack_documents, pack_row, stack_rows
from ultrathink_jax.data.shards import PreparedDataset, ShardRows, prepare
from ultrathink_jax.data.sources import FileSource, HFSource, StdlibCorpus, TextSource
from ultrathink_jax.data.streaming import StreamingTrainIterator
from ultrathink_jax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
CACHE_DIR = "data_cache"
_STATE_VERSION = 1
_ENCODE_CHUNK_CHARS = 4_000_000  # documents handed to the Rust tokenizer per call
_COMPONENT_SHIFT = 40  # mixture row ids: component index above bit 40, row below (2**40 rows per component)
_ROW_MASK = (1 << _COMPONENT_SHIFT) - 1


# ----------------------------------------------------------------------------------------------- sources

def train_source(cfg: ml_collections.ConfigDict) -> TextSource:
    data_config.validate(cfg)
    if cfg.train_files:
        return FileSource(cfg.train_files, cfg.text_column, cfg.txt_split, cfg.max_chars)
    if cfg.hf_dataset:
        return HFSource(cfg.hf_dataset, cfg.hf_config, cfg.hf_split, cfg.text_column, cfg.streaming, cfg.max_chars)
    return StdlibCorpus("train", cfg.heldout_fraction, cfg.default_corpus_max_chars)


def eval_source(cfg: ml_collections.ConfigDict, files: str | Sequence[str] | None = None) -> TextSource | None:
    """`files` overrides the config; None when nothing is configured (user training data with no eval set)."""
    data_config.validate(cfg)
    if files:
        return FileSource(files, cfg.text_column, cfg.txt_split, cfg.eval_max_chars)
    if cfg.eval_files:
        return FileSource(cfg.eval_files, cfg.text_column, cfg.txt_split, cfg.eval_max_chars)
    if cfg.hf_eval_split:
        return HFSource(cfg.hf_dataset, cfg.hf_config, cfg.hf_eval_split, cfg.text_column, cfg.streaming,
                        cfg.eval_max_chars)
    if not cfg.train_files and not cfg.hf_dataset and not cfg.prepared and not cfg.mixture:
        return StdlibCorpus("eval", cfg.heldout_fraction, cfg.eval_max_chars)
    return None


# ----------------------------------------------------------------------------------------------- tokenizer

def build_tokenizer(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None) -> Tokenizer:
    """<workdir>/tokenizer if it exists (resume: the tokenizer the checkpoints were trained with), else
    `cfg.tokenizer`, else a byte-level BPE trained on the training source; saved to <workdir>/tokenizer."""
    data_config.validate(cfg)
    saved = Path(workdir) / TOKENIZER_DIR if workdir is not None else None
    if saved is not None and (saved / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(saved)
        log.info("data: reusing tokenizer %s (vocab %d)", saved, tokenizer.vocab_size)
        return tokenizer
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    elif cfg.prepared or cfg.mixture:  # the ids on disk belong to the tokenizer stored with them
        tokenizer = PreparedDataset(cfg.prepared or data_config.mixture_entries(cfg.mixture)[0][0]).tokenizer()
    else:
        source = train_source(cfg)
        tokenizer = train_tokenizer(_first_chars(source, cfg.tokenizer_train_chars), cfg.vocab_size)
        log.info("data: trained a %d-token byte-level BPE on %s (%s)", tokenizer.vocab_size,
                 source.describe(), source.stats.as_dict())
    if saved is not None:
        import jax

        if jax.process_index() == 0:  # one writer of the run files; the others keep theirs in memory
            tokenizer.save(saved)
    return tokenizer


def _first_chars(documents, cap: int):
    """Documents up to and including the one that reaches `cap` characters (0 = all): a streamed dataset
    has no end to train a tokenizer on."""
    total = 0
    for doc in documents:
        yield doc
        total += len(doc)
        if cap and total >= cap:
            return


# ----------------------------------------------------------------------------------------------- tokens

def load_tokens(source: TextSource, tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None
                ) -> tuple[TokenStream, dict]:
    """Tokenizes every document of `source` (+EOS) into one stream; returns it with read statistics.
    With `cache_dir`, a stream is stored under a key of the source content and the tokenizer, and reused."""
    key = hashlib.sha256((source.fingerprint() + "\0" + tokenizer.fingerprint()).encode("utf-8")).hexdigest()[:20]
    cache_file = Path(cache_dir) / f"tokens-{key}.npz" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as z:
            stream = TokenStream(z["tokens"], z["doc_starts"])
            stats = json.loads(str(z["stats"]))
        log.info("data: %s: %d tokens from cache %s", source.describe(), stream.n_tokens, cache_file)
        return stream, stats

    def encoded() -> Iterator[list[int]]:
        chunk: list[str] = []
        size = 0
        for doc in source:
            chunk.append(doc)
            size += len(doc)
            if size >= _ENCODE_CHUNK_CHARS:
                yield from tokenizer.encode_batch(chunk)
                chunk, size = [], 0
        if chunk:
            yield from tokenizer.encode_batch(chunk)

    stream = pack_documents(encoded(), tokenizer.eos_id, tokenizer.vocab_size)
    stats = {**source.stats.as_dict(), "tokens": stream.n_tokens}
    log.info("data: %s: %s", source.describe(), stats)
    if stats["invalid_utf8"]:
        log.warning("data: %s: replaced %d invalid UTF-8 sequences with U+FFFD", source.describe(),
                    stats["invalid_utf8"])
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_open(cache_file, "wb") as f:
            np.savez(f, tokens=stream.tokens, doc_starts=stream.doc_starts, stats=np.array(json.dumps(stats)))
    return stream, stats


# ----------------------------------------------------------------------------------------------- batches

class _LocalBatch:
    """Global row ids of one batch -> this process's rows, packed. Id -1 = padding row (evaluation). With a
    mixture, id = component << _COMPONENT_SHIFT | row of that component."""

    def __init__(self, rows, seq_len: int, pad_id: int, offset: int, local: int, global_size: int):
        # rows: one callable (row index -> packed row) per mixture component; a TokenStream = one component
        self.rows = [functools.partial(pack_row, rows, seq_len=seq_len, pad_id=pad_id)] if isinstance(
            rows, TokenStream) else list(rows)
        self.seq_len, self.pad_id = seq_len, pad_id
        self.offset, self.local, self.global_size = offset, local, global_size

    def __call__(self, global_rows: np.ndarray) -> dict[str, np.ndarray]:
        ids = np.full(self.global_size, -1, dtype=np.int64)
        ids[:len(global_rows)] = global_rows
        mine = ids[self.offset:self.offset + self.local]
        return stack_rows([self.rows[int(r) >> _COMPONENT_SHIFT](int(r) & _ROW_MASK) if r >= 0
                           else empty_row(self.seq_len, self.pad_id) for r in mine])


class _Tag:
    """Row index -> mixture id of component `c` (a class, not a lambda: grain may pickle it)."""

    def __init__(self, c: int):
        self.c = c

    def __call__(self, row):
        return (self.c << _COMPONENT_SHIFT) | int(row)


class TrainIterator:
    """Endless shuffled batches for this process: dicts of `inputs, targets, segment_ids, positions` int32 and
    `weights` float32, each [global_batch_size / process_count, seq_len]. `get_state()` is a JSON-serialisable
    dict of a few integers; `set_state()` on a fresh iterator over the same data resumes with the very next
    batch, without re-reading anything.

    `data` is one TokenStream, or a list of (ShardRows, weight) mixture components: each component is shuffled
    (a new permutation each epoch) and repeated on its own, and grain's `mix` interleaves them by weight."""

    def __init__(self, data, stats: dict, cfg: ml_collections.ConfigDict, pad_id: int,
                 process_index: int | None = None, process_count: int | None = None):
        self.stats = stats
        self.seq_len = cfg.seq_len
        self.global_batch_size = cfg.global_batch_size
        offset, self.local_batch_size = process_slice(cfg.global_batch_size, process_index, process_count)
        components = [(ShardRows([data], cfg.seq_len, pad_id), 1.0)] if isinstance(data, TokenStream) else data
        for rows, _ in components:
            if rows.n_rows == 0:
                raise DataError(f"training data has {rows.n_tokens} tokens; seq_len={cfg.seq_len} needs at least "
                                f"{cfg.seq_len + 1}")
        self.n_rows = sum(rows.n_rows for rows, _ in components)
        # Identifies the data order; resuming with other data or settings would silently change the batches.
        self._fingerprint = {"rows": self.n_rows, "tokens": sum(r.n_tokens for r, _ in components),
                             "seq_len": cfg.seq_len, "global_batch_size": cfg.global_batch_size, "seed": cfg.seed}
        if len(components) == 1:
            rows_ds = grain.MapDataset.range(self.n_rows).shuffle(seed=cfg.seed).repeat(None)  # reseeds per epoch
        else:
            self._fingerprint["mixture"] = [[r.n_rows, w] for r, w in components]
            parts = [grain.MapDataset.range(r.n_rows).shuffle(seed=cfg.seed + 7919 * c).repeat(None).map(_Tag(c))
                     for c, (r, _) in enumerate(components)]
            rows_ds = grain.MapDataset.mix(parts, [w for _, w in components])
        dataset = (rows_ds.batch(cfg.global_batch_size, drop_remainder=True)
                   .map(_LocalBatch([r for r, _ in components], cfg.seq_len, pad_id, offset,
                                    self.local_batch_size, cfg.global_batch_size)))
        self._iter = dataset.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                               prefetch_buffer_size=cfg.prefetch_buffer_size)
                                             ).__iter__()

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict:
        return {"version": _STATE_VERSION, "data": dict(self._fingerprint), "grain": self._iter.get_state()}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION or "grain" not in state:
            raise DataError(f"data iterator state is not a version-{_STATE_VERSION} state: {state!r}")
        if state.get("data") != self._fingerprint:
            raise DataError(f"data iterator state was saved for different data {state.get('data')}, "
                            f"this run has {self._fingerprint}")
        self._iter.set_state(state["grain"])


class EvalBatches:
    """A deterministic, re-iterable pass over evaluation data: no shuffle, the final partial row and final
    partial batch kept, padded with weight 0. Every process yields the same number of batches."""

    def __init__(self, stream: TokenStream, stats: dict, cfg: ml_collections.ConfigDict, pad_id: int,
                 process_index: int | None = None, process_count: int | None = None):
        self.stats = stats
        offset, self.local_batch_size = process_slice(cfg.global_batch_size, process_index, process_count)
        self.n_rows = num_rows(stream.n_tokens, cfg.seq_len, keep_partial=True)
        if self.n_rows == 0:
            raise DataError(f"evaluation data has {stream.n_tokens} token(s); at least 2 are needed")
        self._dataset = (grain.MapDataset.range(self.n_rows)
                         .batch(cfg.global_batch_size, drop_remainder=False)
                         .map(_LocalBatch(stream, cfg.seq_len, pad_id, offset, self.local_batch_size,
                                          cfg.global_batch_size)))
        self._read_options = grain.ReadOptions(num_threads=cfg.read_threads,
                                               prefetch_buffer_size=cfg.prefetch_buffer_size)
        # Total scored targets over all processes (the held-out mean-loss denominator): every adjacent token
        # pair of the stream is one row's (input, target), scored unless it crosses into the next document.
        self.n_targets = stream.n_tokens - stream.n_documents

    def __len__(self) -> int:
        return len(self._dataset)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self._dataset.to_iter_dataset(self._read_options))


# ----------------------------------------------------------------------------------------------- entry points

def _cache_dir(cfg: ml_collections.ConfigDict, workdir) -> Path | None:
    return Path(workdir) / CACHE_DIR if (cfg.cache and workdir is not None) else None


def build_train_iterator(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer,
                         workdir: str | os.PathLike | None = None, *, process_index: int | None = None,
                         process_count: int | None = None) -> TrainIterator | StreamingTrainIterator:
    """Training batches for this process (process index/count default to jax's). Prepared token shards are
    read by index: `data.prepared` / `data.mixture`, else the source tokenized once into the workdir's cache
    (by process 0; the others wait). A streamed Hugging Face dataset is read lazily (see `streaming.py`);
    without a workdir (or with cache=False) the source is tokenized into memory."""
    if cfg.hf_dataset and cfg.streaming:
        _warn_stream_readers(cfg)
        return StreamingTrainIterator(train_source(cfg), tokenizer, cfg, process_index, process_count)
    entries = _prepared_entries(cfg, tokenizer, workdir, process_index)
    if entries is None:
        stream, stats = load_tokens(train_source(cfg), tokenizer, _cache_dir(cfg, workdir))
        return TrainIterator(stream, stats, cfg, tokenizer.pad_id, process_index, process_count)
    expected = hashlib.sha256(tokenizer.fingerprint().encode()).hexdigest()
    components, stats = [], {}
    for directory, weight in entries:
        dataset = PreparedDataset(directory)
        if dataset.tokenizer_sha256 != expected:
            raise DataError(f"prepared dataset {directory} was tokenized with another tokenizer than this run's "
                            f"({tokenizer.source}); prepare it again or train in a new workdir")
        components.append((ShardRows(dataset.streams, cfg.seq_len, tokenizer.pad_id), weight))
        stats = {k: stats.get(k, 0) + v for k, v in dataset.stats.items()}
    return TrainIterator(components, stats, cfg, tokenizer.pad_id, process_index, process_count)


def _warn_stream_readers(cfg: ml_collections.ConfigDict) -> None:
    """read_threads / prefetch_buffer_size drive grain's readers; a stream is cut in order by the training loop."""
    defaults = data_config.default_config()
    changed = [f"{k}={cfg[k]}" for k in ("read_threads", "prefetch_buffer_size") if cfg[k] != defaults[k]]
    if changed:
        log.warning("data: %s not used for the training stream (streaming=True reads and packs it in order, in "
                    "the training loop); they apply only to the evaluation batches", ", ".join(changed))


def _prepared_entries(cfg, tokenizer: Tokenizer, workdir, process_index: int | None
                      ) -> list[tuple[str, float]] | None:
    if cfg.mixture:
        return data_config.mixture_entries(cfg.mixture)
    if cfg.prepared:
        return [(cfg.prepared, 1.0)]
    cache = _cache_dir(cfg, workdir)
    if cache is None:
        return None
    import jax

    source = train_source(cfg)
    key = hashlib.sha256((source.fingerprint() + "\0" + tokenizer.fingerprint()).encode("utf-8")).hexdigest()[:20]
    out = cache / f"prepared-{key}"
    first = (jax.process_index() if process_index is None else process_index) == 0
    if first:  # one writer on the shared workdir
        if not (out / "manifest.json").is_file():
            log.info("data: tokenizing %s into %s", source.describe(), out)
        prepare(source, tokenizer, out, workers=cfg.tokenize_workers, shard_chars=cfg.shard_chars)
    if process_index is None and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"ultrathink-prepared-{key}")
    return [(str(out), 1.0)]


def build_eval_iterator(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, files: str | Sequence[str] | None = None,
                        workdir: str | os.PathLike | None = None, *, process_index: int | None = None,
                        process_count: int | None = None) -> EvalBatches | None:
    """Evaluation batches from `files`, else the configured eval source; None if no eval data is configured."""
    source = eval_source(cfg, files)
    if source is None:
        return None
    stream, stats = load_tokens(source, tokenizer, _cache_dir(cfg, workdir))
    return EvalBatches(stream, stats, cfg, tokenizer.pad_id, process_index, process_count)
