"""The one-line form of an error message: every error the project reports is a single line."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """Library messages (tokenizers, pyarrow, orbax, safetensors) can span lines; ours promise one."""
    return " ".join(str(exc).split()) or type(exc).__name__
