"""Prepared datasets: text tokenized once into token shards on disk, then read by row index.

    DIR/manifest.json                 format, tokenizer fingerprint, sources (description + content sha256),
                                      per-shard document/token counts; written last, so DIR is complete iff it exists
    DIR/tokenizer/                    the tokenizer the ids belong to (Hugging Face loadable)
    DIR/shard-00000.tokens.npy        flat token ids of the shard's documents, each followed by EOS (uint16/int32)
    DIR/shard-00000.docs.npy          int64 offset of each document's first token in that shard

Documents are cut into shards of about `shard_chars` characters in read order; worker processes (a standard
`ProcessPoolExecutor`, `spawn`ed so they never inherit a JAX runtime) tokenize and write one shard each,
to a temporary name renamed into place only when complete. A crash therefore leaves either finished shards
and no manifest (the directory is re-tokenized on the next try) or the whole dataset.

Reading memory-maps the shards: row r of shard s is `packing.pack_row` of that shard's stream (rows never
cross a shard boundary: at most seq_len tokens per shard are unused), and `ShardRows` numbers the rows of all
shards consecutively, so the grain pipeline only ever handles integers.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import json
import multiprocessing
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ultrathink_jax import atomic
from ultrathink_jax.data.errors import DataError, DataFileNotFoundError
from ultrathink_jax.data.packing import TokenStream, num_rows, pack_documents, pack_row
from ultrathink_jax.data.tokenizer import Tokenizer, load_tokenizer
from ultrathink_jax.errors import one_line

MANIFEST = "manifest.json"
FORMAT = "ultrathink-token-shards/1"
TOKENIZER_SUBDIR = "tokenizer"


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic.atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _write_shard(out: Path, index: int, stream: TokenStream) -> dict:
    name = _shard_name(index)
    _save_npy_atomic(out / f"{name}.docs.npy", stream.doc_starts)
    _save_npy_atomic(out / f"{name}.tokens.npy", stream.tokens)  # the tokens file last: it marks completion
    return {"name": name, "documents": stream.n_documents, "tokens": stream.n_tokens}


# ---------------------------------------------------------------------------------------------------- workers

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one Rust thread pool per worker is plenty
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _encode_and_write(out: str, index: int, texts: list[str]) -> dict:
    tok = _worker_tokenizer
    stream = pack_documents(tok.encode_batch(texts), tok.eos_id, tok.vocab_size)
    return _write_shard(Path(out), index, stream)


def _chunks(documents: Iterable[str], shard_chars: int, digest) -> Iterator[tuple[list[str], int]]:
    """(documents, characters) of about shard_chars each, hashing every document's text into `digest`."""
    chunk, size = [], 0
    for doc in documents:
        digest.update(doc.encode("utf-8", errors="surrogatepass"))
        digest.update(b"\0")
        chunk.append(doc)
        size += len(doc)
        if size >= shard_chars:
            yield chunk, size
            chunk, size = [], 0
    if chunk:
        yield chunk, size


# ---------------------------------------------------------------------------------------------------- writing

def read_manifest(directory: str | os.PathLike) -> dict | None:
    f = Path(directory) / MANIFEST
    if not f.is_file():
        return None
    try:
        manifest = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"prepared dataset {directory}: unreadable {MANIFEST}: {one_line(e)}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"prepared dataset {directory}: {MANIFEST} is not a {FORMAT} manifest")
    return manifest


def prepare(source, tokenizer: Tokenizer, out: str | os.PathLike, *, workers: int = 2,
            shard_chars: int = 32_000_000, progress: bool = False,
            on_progress: Callable[[int], None] | None = None) -> dict:
    """Tokenizes every document of `source` into shards under `out` and returns the manifest. A directory that
    already holds a manifest for the same source and tokenizer is reused as it is; one for other data is an
    error (nothing is overwritten)."""
    out = Path(out)
    key = {"source": source.fingerprint(), "tokenizer": hashlib.sha256(tokenizer.fingerprint().encode()).hexdigest()}
    existing = read_manifest(out)
    if existing is not None:
        if existing.get("key") == key:
            return existing
        raise DataError(f"{out} already holds a prepared dataset of {existing['sources'][0]['description']!r} "
                        "with another source or tokenizer; choose another directory")
    if workers < 0 or shard_chars <= 0:
        raise DataError(f"tokenize workers={workers} must be >= 0 and shard_chars={shard_chars} positive")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("shard-*"):  # left by an interrupted run: never mixed into this one
        stale.unlink()
    tokenizer.save(out / TOKENIZER_SUBDIR)
    digest = hashlib.sha256()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=source.max_chars or None, unit="char", unit_scale=True, desc=f"tokenize {out.name}",
                   smoothing=0.1)

    def advance(chars: int):
        if bar is not None:
            bar.update(chars)
        if on_progress is not None:
            on_progress(chars)

    shards: list[dict] = []
    chunks = _chunks(source, shard_chars, digest)
    head = [c for c in (next(chunks, None), next(chunks, None)) if c is not None]
    chunks = itertools.chain(head, chunks)
    try:
        if workers == 0 or len(head) < 2:  # a single shard is not worth starting worker processes
            for index, (texts, chars) in enumerate(chunks):
                stream = pack_documents(tokenizer.encode_batch(texts), tokenizer.eos_id, tokenizer.vocab_size)
                shards.append(_write_shard(out, index, stream))
                advance(chars)
        else:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                        initargs=(str(out / TOKENIZER_SUBDIR),)) as pool:
                pending: dict[concurrent.futures.Future, int] = {}
                results: dict[int, dict] = {}

                def collect(futures):
                    for f in futures:
                        results[pending.pop(f)] = f.result()
                        advance(results_chars.pop(f))

                results_chars: dict[concurrent.futures.Future, int] = {}
                for index, (texts, chars) in enumerate(chunks):
                    if len(pending) >= 2 * workers:  # bounded text in flight
                        collect(concurrent.futures.wait(
                            pending, return_when=concurrent.futures.FIRST_COMPLETED).done)
                    future = pool.submit(_encode_and_write, str(out), index, texts)
                    pending[future], results_chars[future] = index, chars
                collect(list(concurrent.futures.as_completed(list(pending))))
                shards = [results[i] for i in range(len(results))]
    finally:
        if bar is not None:
            bar.close()
    stats = source.stats.as_dict()
    manifest = {
        "format": FORMAT, "key": key,
        "tokenizer": {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "source": tokenizer.source,
                      "sha256": key["tokenizer"]},
        "sources": [{"description": source.describe(), "fingerprint": source.fingerprint(),
                     "content_sha256": digest.hexdigest(), **stats}],
        "dtype": str(np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.int32)),
        "documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
    }
    atomic.write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------------- reading

class PreparedDataset:
    """A prepared dataset directory, its shards memory-mapped (nothing is read until a row is)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise DataFileNotFoundError(f"not a prepared dataset (no {MANIFEST}): {self.directory}; "
                                        "write one with python -m launch.tokenize")
        self.manifest = manifest
        self.streams: list[TokenStream] = []
        for shard in manifest["shards"]:
            paths = [self.directory / f"{shard['name']}.{part}.npy" for part in ("tokens", "docs")]
            for p in paths:
                if not p.is_file():
                    raise DataFileNotFoundError(f"prepared dataset {self.directory}: missing shard file {p.name}")
            try:
                tokens, docs = (np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)
            except ValueError as e:
                raise DataError(f"prepared dataset {self.directory}: damaged shard {shard['name']}: {e}") from e
            if len(tokens) != shard["tokens"] or len(docs) != shard["documents"]:
                raise DataError(f"prepared dataset {self.directory}: shard {shard['name']} holds {len(tokens)} "
                                f"tokens / {len(docs)} documents, the manifest says {shard['tokens']} / "
                                f"{shard['documents']}")
            self.streams.append(TokenStream(tokens, docs))

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def stats(self) -> dict:
        return {"documents": self.manifest["documents"], "tokens": self.manifest["tokens"],
                **{k: sum(s.get(k, 0) for s in self.manifest["sources"]) for k in ("files", "chars", "invalid_utf8")}}

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.directory / TOKENIZER_SUBDIR)


class ShardRows:
    """Rows of seq_len + 1 tokens (stride seq_len) of every shard, numbered consecutively shard after shard."""

    def __init__(self, streams: list[TokenStream], seq_len: int, pad_id: int):
        self.streams, self.seq_len, self.pad_id = streams, seq_len, pad_id
        counts = [num_rows(s.n_tokens, seq_len, keep_partial=False) for s in streams]
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n_rows = int(self.first[-1])
        self.n_tokens = int(sum(s.n_tokens for s in streams))

    def __call__(self, row: int) -> dict[str, np.ndarray]:
        shard = int(np.searchsorted(self.first, row, side="right")) - 1
        return pack_row(self.streams[shard], int(row - self.first[shard]), self.seq_len, self.pad_id)
