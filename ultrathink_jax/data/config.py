"""Every data option, in one ConfigDict (the trainer nests it as `config.data`)."""

from __future__ import annotations

import ml_collections

from ultrathink_jax.data.errors import DataError
from ultrathink_jax.data.sources import TXT_SPLITS


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Training text. Neither train_files nor hf_dataset set = the embedded stdlib corpus (no download).
    c.train_files = ""  # comma-separated files / globs / directories of .txt, .jsonl, .parquet
    c.eval_files = ""  # held-out files for evaluation loss
    c.txt_split = "file"  # .txt documents: "file", "paragraph" (blank-line separated) or "line"
    c.text_column = "text"  # .jsonl field, .parquet column and Hugging Face dataset column
    c.hf_dataset = ""  # datasets.load_dataset path: a hub id or a local directory of data files
    c.hf_config = ""  # dataset configuration name ("" = none)
    c.hf_split = "train"
    c.hf_eval_split = ""  # "" = no Hugging Face evaluation split
    c.streaming = False  # stream the Hugging Face dataset instead of downloading it whole
    # Prepared token shards (`python -m launch.tokenize`), read by index. Neither set = the source above is
    # tokenized once into <workdir>/data_cache/prepared-<key>/ (with `cache`) and read the same way.
    c.prepared = ""  # a prepared dataset directory
    c.mixture = ""  # several, with weights: "DIR:0.7,DIR2:0.3" (deterministic by seed, resumes exactly)
    c.tokenize_workers = 2  # worker processes tokenizing shards (0 = in this process; 1 shard = always here)
    c.shard_chars = 32_000_000  # text per token shard (about 8M tokens)
    c.max_chars = 0  # cap on training characters read from files / Hugging Face (0 = all)
    c.eval_max_chars = 0  # cap on evaluation characters, any source (0 = all)
    # Embedded default corpus: the interpreter's standard-library .py files.
    c.default_corpus_max_chars = 8_000_000  # about 2M tokens: tokenizes in seconds on 2 cores
    c.heldout_fraction = 0.02  # share of stdlib files held out (fixed by a hash of their path) for evaluation
    # Tokenizer: a path (HF directory, tokenizer.json, or "vocab.json,merges.txt"), or "" = train a byte-level
    # BPE of vocab_size on the training text. Either way it is saved to <workdir>/tokenizer and reused on resume.
    c.tokenizer = ""
    c.vocab_size = 8192
    c.tokenizer_train_chars = 100_000_000  # training text read to train that BPE (0 = all; needed for streams)
    # Batches.
    c.seq_len = 256
    c.global_batch_size = 16  # rows per step summed over all processes
    c.seed = 0  # shuffle seed; each epoch gets its own permutation
    c.shuffle_buffer_rows = 1024  # streamed Hugging Face data: rows mixed in a seeded buffer (1 = stream order)
    # Readers of indexed data (token shards, evaluation): a stream is cut in order in the training loop instead,
    # so with streaming=True they set only the evaluation batches (a changed value is warned about).
    c.read_threads = 2  # threads building batches ahead of the training step
    c.prefetch_buffer_size = 4  # batches buffered ahead
    c.cache = True  # keep tokenized corpora in <workdir>/data_cache, keyed by content and tokenizer
    return c


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raises DataError naming the first unusable option."""
    unknown = sorted(set(cfg.keys()) - set(default_config().keys()))
    if unknown:
        raise DataError(f"data config: unknown field(s) {unknown}")
    checks = [
        ("seq_len", cfg.seq_len > 0, "must be positive"),
        ("global_batch_size", cfg.global_batch_size > 0, "must be positive"),
        ("vocab_size", cfg.vocab_size >= 257, "must be >= 257 (256 bytes + <|endoftext|>)"),
        ("tokenizer_train_chars", cfg.tokenizer_train_chars >= 0, "must be >= 0 (0 = all)"),
        ("txt_split", cfg.txt_split in TXT_SPLITS, f"must be one of {TXT_SPLITS}"),
        ("heldout_fraction", 0.0 < cfg.heldout_fraction < 1.0, "must be in (0, 1)"),
        ("max_chars", cfg.max_chars >= 0, "must be >= 0 (0 = all)"),
        ("eval_max_chars", cfg.eval_max_chars >= 0, "must be >= 0 (0 = all)"),
        ("default_corpus_max_chars", cfg.default_corpus_max_chars >= 0, "must be >= 0 (0 = all)"),
        ("seed", 0 <= cfg.seed < 2**32, "must be in [0, 2**32)"),
        ("shuffle_buffer_rows", cfg.shuffle_buffer_rows >= 1, "must be >= 1 (1 = no shuffling)"),
        ("read_threads", cfg.read_threads >= 1, "must be >= 1"),
        ("prefetch_buffer_size", cfg.prefetch_buffer_size >= 1, "must be >= 1"),
        ("train_files", not (cfg.train_files and cfg.hf_dataset), "and hf_dataset are both set; choose one"),
        ("eval_files", not (cfg.eval_files and cfg.hf_eval_split), "and hf_eval_split are both set; choose one"),
        ("hf_eval_split", not (cfg.hf_eval_split and not cfg.hf_dataset), "is set but hf_dataset is empty"),
        ("streaming", not (cfg.streaming and not cfg.hf_dataset),
         "is set but hf_dataset is empty: only a Hugging Face dataset is streamed (local files and prepared "
         "datasets are read by index from token shards); set hf_dataset or drop streaming"),
        ("tokenize_workers", cfg.tokenize_workers >= 0, "must be >= 0 (0 = in this process)"),
        ("shard_chars", cfg.shard_chars > 0, "must be positive"),
        ("prepared", not (cfg.prepared and cfg.mixture), "and mixture are both set; choose one"),
        ("prepared", not ((cfg.prepared or cfg.mixture) and (cfg.train_files or cfg.hf_dataset)),
         "(or mixture) is set together with train_files/hf_dataset; a prepared dataset already holds the "
         "training text: set one"),
    ]
    for name, ok, why in checks:
        if not ok:
            raise DataError(f"data config: {name}={cfg[name]!r} {why}")
    mixture_entries(cfg.mixture)


def mixture_entries(text: str) -> list[tuple[str, float]]:
    """"DIR:0.7,DIR2:0.3" -> [(DIR, 0.7), (DIR2, 0.3)]; raises DataError naming a malformed entry."""
    entries = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        path, sep, weight = item.rpartition(":")
        try:
            w = float(weight)
        except ValueError:
            w = float("nan")
        if not sep or not path or not w > 0:
            raise DataError(f"data config: mixture entry {item!r} must be DIR:WEIGHT with a positive weight")
        entries.append((path, w))
    if len(entries) == 1:
        raise DataError(f"data config: mixture={text!r} has one dataset; use data.prepared for one")
    return entries
