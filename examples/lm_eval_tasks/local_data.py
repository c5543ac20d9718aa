"""Dataset loaders for the local lm-eval tasks in this folder (referenced from the YAML as `custom_dataset`).

lm-eval resolves a YAML's `dataset_kwargs.data_files` against the current working directory, so a task using it
only works when launched from one place. These loaders read the files next to this module instead, build the
split in memory (no Hugging Face hub, no datasets cache), and work from any directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


class LocalTaskDataError(ValueError):
    """A task data file is malformed; the message names the file and line."""


class TaskDataFileNotFoundError(FileNotFoundError):
    """A task data file is missing; the message names its path."""


def _read(name: str) -> str:
    path = HERE / name
    if not path.is_file():
        raise TaskDataFileNotFoundError(f"task data file does not exist: {path}")
    return path.read_text(encoding="utf-8")


def completion_items(**_metadata) -> datasets.DatasetDict:
    """completion.jsonl: one {"context", "choices", "answer"} object per line, `answer` indexing `choices`."""
    rows = []
    for number, line in enumerate(_read("completion.jsonl").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise LocalTaskDataError(f"completion.jsonl line {number}: invalid JSON ({e.msg})") from None
        if set(item) != {"context", "choices", "answer"}:
            raise LocalTaskDataError(f"completion.jsonl line {number}: keys {sorted(item)}, "
                                     "expected ['answer', 'choices', 'context']")
        if not 0 <= item["answer"] < len(item["choices"]):
            raise LocalTaskDataError(f"completion.jsonl line {number}: answer {item['answer']} is not an index "
                                     f"into {len(item['choices'])} choices")
        rows.append(item)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def prose_documents(**_metadata) -> datasets.DatasetDict:
    """prose.txt: documents separated by blank lines (each scored as one rolling log-likelihood)."""
    docs = [" ".join(block.split()) for block in _read("prose.txt").split("\n\n") if block.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": d} for d in docs])})
