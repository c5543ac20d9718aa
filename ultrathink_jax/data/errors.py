"""Data errors: each carries one line that names the offending path, pattern, field or value."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input (empty corpus, malformed record, unusable option); the message says which and where."""


class DataFileNotFoundError(FileNotFoundError, DataError):
    """A path or glob that matches nothing; catchable as FileNotFoundError or as DataError."""


class TokenizerError(DataError):
    """A tokenizer that cannot be read or used; the message names the path."""

