"""Text sources: re-iterable collections of document strings, each keeping statistics of its last pass.

* `StdlibCorpus` -- the embedded default: the running interpreter's standard-library `.py` files, present on
  every machine with no download. A fixed held-out split by a stable hash of each file's relative path.
* `FileSource` -- local files by glob(s): `.txt` (per file, paragraph or line), `.jsonl` (a text field),
  `.parquet` (a text column).
* `HFSource` -- a Hugging Face dataset through `datasets.load_dataset` (hub name or local path), optionally streamed.

Invalid UTF-8 in local files is replaced with U+FFFD and counted in `stats.invalid_utf8`; a text file with more
than 25% of its characters invalid (random bytes: about half) is refused as binary.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Iterator, Sequence

from ultrathink_jax.data.errors import DataError, DataFileNotFoundError
from ultrathink_jax.errors import one_line

TXT_SPLITS = ("file", "paragraph", "line")
_TEXT_SUFFIXES = (".txt", ".text", ".md")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = _TEXT_SUFFIXES + _JSONL_SUFFIXES + _PARQUET_SUFFIXES


@dataclasses.dataclass
class SourceStats:
    """What the last full pass over a source read. `invalid_utf8` counts replaced invalid byte sequences."""
    files: int = 0
    documents: int = 0
    chars: int = 0
    invalid_utf8: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class TextSource:
    """Base: iterate for documents (non-empty strings); `describe()` identifies the content for caching."""

    def __init__(self, max_chars: int = 0):
        self.max_chars = max_chars  # 0 = no cap; else stop after the document that reaches the cap
        self.stats = SourceStats()

    def describe(self) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Text that changes whenever the documents could: part of the token-cache key."""
        return self.describe()

    def _documents(self, stats: SourceStats) -> Iterator[str]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        stats = SourceStats()
        self.stats = stats
        for doc in self._documents(stats):
            if not doc:
                continue
            stats.documents += 1
            stats.chars += len(doc)
            yield doc
            if self.max_chars and stats.chars >= self.max_chars:
                break
        if stats.documents == 0:
            raise DataError(f"no text found in {self.describe()}")


# ---------------------------------------------------------------------------------------------------------------
# Invalid UTF-8: decode with a replacing error handler that counts (per thread, so concurrent readers don't mix).

_counter = threading.local()
MAX_INVALID_UTF8_FRACTION = 0.25  # a text file with more of its characters invalid than this is refused


def _count_and_replace(exc: UnicodeError):
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _counter.n = getattr(_counter, "n", 0) + 1
    return "\ufffd", exc.end


codecs.register_error("ultrathink_count_replace", _count_and_replace)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decodes like errors="replace" and returns (text, number of invalid sequences replaced)."""
    _counter.n = 0
    text = data.decode("utf-8", errors="ultrathink_count_replace")
    return text, _counter.n


def read_utf8_file(path: Path) -> tuple[str, int]:
    """(text, invalid sequences replaced); a mostly-invalid file is binary, not text, and is refused."""
    text, bad = decode_utf8(Path(path).read_bytes())
    if bad > MAX_INVALID_UTF8_FRACTION * len(text):
        raise DataError(f"{path} is not UTF-8 text: {bad} of its {len(text)} characters are invalid UTF-8 "
                        f"(more than {MAX_INVALID_UTF8_FRACTION:.0%}); below that they are replaced and counted")
    return text, bad


# ---------------------------------------------------------------------------------------------------------------

class StdlibCorpus(TextSource):
    """The standard library's `.py` files. `split` is "train" or "eval"; a file is held out iff the stable hash
    of its relative path falls below `heldout_fraction`, so the split never depends on the cap or the order.
    Files are read in hash order (a fixed, machine-independent shuffle), so a char cap samples all packages."""

    def __init__(self, split: str, heldout_fraction: float, max_chars: int = 0, root: str | None = None):
        super().__init__(max_chars)
        if split not in ("train", "eval"):
            raise DataError(f"stdlib corpus split={split!r} must be 'train' or 'eval'")
        if not 0.0 < heldout_fraction < 1.0:
            raise DataError(f"heldout_fraction={heldout_fraction} must be in (0, 1)")
        self.split = split
        self.heldout_fraction = heldout_fraction
        self.root = Path(root or sysconfig.get_paths()["stdlib"])

    def files(self) -> list[Path]:
        chosen = [(_unit_hash("order:" + rel), rel) for rel in _python_files(self.root)
                  if (_unit_hash(rel) < self.heldout_fraction) == (self.split == "eval")]
        return [self.root / rel for _, rel in sorted(chosen)]

    def describe(self) -> str:
        return (f"stdlib corpus {self.root} (python {sys.version_info.major}.{sys.version_info.minor}, "
                f"split={self.split}, heldout_fraction={self.heldout_fraction}, max_chars={self.max_chars})")

    def fingerprint(self) -> str:
        return f"{self.describe()} {sys.version}"

    def _documents(self, stats: SourceStats) -> Iterator[str]:
        for path in self.files():
            try:
                data = path.read_bytes()
            except OSError:
                continue  # an unreadable stdlib file (permissions) is skipped, not fatal
            stats.files += 1
            text, bad = decode_utf8(data)
            stats.invalid_utf8 += bad
            yield text


@functools.lru_cache(maxsize=4)
def _python_files(root: Path) -> tuple[str, ...]:
    """Relative paths of the `.py` files under root (listed once per process: a scan takes about a second)."""
    if not root.is_dir():
        raise DataFileNotFoundError(f"standard library directory not found: {root}")
    rels = (p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    # Installed third-party code is not the same on every machine.
    return tuple(sorted(r for r in rels if "site-packages" not in r and "dist-packages" not in r))


def _unit_hash(text: str) -> float:
    """Stable across processes and machines (unlike hash()): a number in [0, 1)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


# ---------------------------------------------------------------------------------------------------------------

def split_patterns(value: str | Sequence[str]) -> list[str]:
    """A config value of globs: a comma-separated string or a list; empty entries are dropped."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item and item.strip()]


def expand_patterns(patterns: Sequence[str]) -> list[Path]:
    """Sorted files matching each pattern in turn; a directory means its supported files. Duplicates dropped."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(os.path.expanduser(pattern))
        if glob.has_magic(pattern):
            matched = sorted(Path(m) for m in glob.glob(os.path.expanduser(pattern), recursive=True))
            matched = [m for m in matched if m.is_file()]
            if not matched:
                raise DataFileNotFoundError(f"data pattern matches no files: {pattern}")
        elif path.is_dir():
            matched = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
            if not matched:
                raise DataFileNotFoundError(f"data directory has no {'/'.join(SUPPORTED_SUFFIXES)} files: {path}")
        elif path.is_file():
            matched = [path]
        else:
            raise DataFileNotFoundError(f"data file does not exist: {pattern}")
        for m in matched:
            if m.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise DataError(f"unsupported data file type {m.suffix or '(none)'!r}: {m} "
                                f"(supported: {', '.join(SUPPORTED_SUFFIXES)})")
            if m not in files:
                files.append(m)
    return files


class FileSource(TextSource):
    def __init__(self, patterns: str | Sequence[str], text_column: str = "text", txt_split: str = "file",
                 max_chars: int = 0):
        super().__init__(max_chars)
        self.patterns = split_patterns(patterns)
        if not self.patterns:
            raise DataError("no data files given (empty pattern list)")
        if txt_split not in TXT_SPLITS:
            raise DataError(f"txt_split={txt_split!r} must be one of {TXT_SPLITS}")
        self.text_column = text_column
        self.txt_split = txt_split
        self.paths = expand_patterns(self.patterns)  # fail fast, before any tokenizer training

    def describe(self) -> str:
        return f"files {','.join(self.patterns)}"

    def fingerprint(self) -> str:
        """Changes when any file changes (size or mtime): part of the token-cache key."""
        parts = [self.describe(), self.text_column, self.txt_split, str(self.max_chars)]
        for p in self.paths:
            st = p.stat()
            parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
        return "\n".join(parts)

    def _documents(self, stats: SourceStats) -> Iterator[str]:
        for path in self.paths:
            stats.files += 1
            suffix = path.suffix.lower()
            if suffix in _JSONL_SUFFIXES:
                yield from self._jsonl(path, stats)
            elif suffix in _PARQUET_SUFFIXES:
                yield from self._parquet(path)
            else:
                yield from self._text(path, stats)

    def _text(self, path: Path, stats: SourceStats) -> Iterator[str]:
        text, bad = read_utf8_file(path)
        stats.invalid_utf8 += bad
        if self.txt_split == "file":
            yield text
        elif self.txt_split == "line":
            yield from (line for line in text.splitlines() if line.strip())
        else:  # paragraphs are separated by blank lines
            yield from (p.strip("\n") for p in re.split(r"\n(?:[ \t\r\f\v]*\n)+", text) if p.strip())

    def _jsonl(self, path: Path, stats: SourceStats) -> Iterator[str]:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                line, bad = decode_utf8(raw)
                stats.invalid_utf8 += bad
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON: {one_line(e)}") from e
                if not isinstance(record, dict) or self.text_column not in record:
                    raise DataError(f"{path}:{lineno}: record has no field {self.text_column!r}")
                value = record[self.text_column]
                if not isinstance(value, str):
                    raise DataError(f"{path}:{lineno}: field {self.text_column!r} is "
                                    f"{type(value).__name__}, expected a string")
                yield value

    def _parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq  # only needed for parquet input

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a corrupt file
            raise DataError(f"cannot read parquet file {path}: {one_line(e)}") from e
        names = pf.schema_arrow.names
        if self.text_column not in names:
            raise DataError(f"parquet file {path} has no column {self.text_column!r} (columns: {names})")
        for batch in pf.iter_batches(columns=[self.text_column], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if value is not None:
                    yield value if isinstance(value, str) else value.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------------

class HFSource(TextSource):
    """A dataset through `datasets.load_dataset(name, config, split=..., streaming=...)`. `name` may be a hub id
    or a local directory of data files (the builder is inferred from their type)."""

    def __init__(self, name: str, config: str = "", split: str = "train", text_column: str = "text",
                 streaming: bool = False, max_chars: int = 0):
        super().__init__(max_chars)
        if not name:
            raise DataError("hf_dataset is empty")
        self.name, self.config, self.split = name, config, split
        self.text_column, self.streaming = text_column, streaming
        self._builder_hash: str | None = None  # computed once per source (it lists the data files)

    def describe(self) -> str:
        config = f"/{self.config}" if self.config else ""
        return f"hugging face dataset {self.name}{config} split={self.split}"

    def fingerprint(self) -> str:
        """Name and split, plus the builder's hash: datasets derives it from the hub revision or the local data
        files (paths and modification times), so a new revision or an edited file is a new cache key."""
        if self._builder_hash is None:
            builder = self._call(lambda datasets: datasets.load_dataset_builder(self.name, self.config or None))
            self._builder_hash = f"{builder.config_id}:{builder.hash}"
        return "\n".join([self.describe(), self._builder_hash, self.text_column, str(self.max_chars)])

    def _call(self, fn):
        """fn(datasets), with its errors as one DataError line naming the dataset."""
        import datasets  # heavy import; only when a Hugging Face source is configured

        try:
            return fn(datasets)
        except FileNotFoundError as e:
            raise DataFileNotFoundError(f"cannot load {self.describe()}: {one_line(e)}") from e
        except (ValueError, KeyError, ConnectionError, OSError) as e:  # bad split / config / offline hub
            raise DataError(f"cannot load {self.describe()}: {one_line(e)}") from e

    def load(self):
        ds = self._call(lambda datasets: datasets.load_dataset(self.name, self.config or None, split=self.split,
                                                               streaming=self.streaming))
        columns = ds.column_names
        if columns is not None and self.text_column not in columns:
            raise DataError(f"{self.describe()} has no column {self.text_column!r} (columns: {columns})")
        return ds

    def _documents(self, stats: SourceStats) -> Iterator[str]:
        # select_columns avoids decoding unused columns (images, metadata) on each row.
        ds = self.load()
        if ds.column_names is not None:
            ds = ds.select_columns([self.text_column])
        for row in ds:
            value = row.get(self.text_column)
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"{self.describe()}: column {self.text_column!r} holds "
                                f"{type(value).__name__}, expected strings")
            yield value
