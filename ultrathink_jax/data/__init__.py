"""Data: tokenizer, text sources, packing and the grain input pipeline.

The trainer needs four calls (`cfg` is `default_config()`, nested as `config.data`):

    tokenizer = build_tokenizer(cfg, workdir)        # load, or train a BPE; saved to <workdir>/tokenizer
    train = build_train_iterator(cfg, tokenizer, workdir)
    batch = next(train)                               # this process's slice of one global batch
    state = train.get_state()                         # JSON-serialisable; fresh_iterator.set_state(state) resumes
    evals = build_eval_iterator(cfg, tokenizer, workdir=workdir)   # None if no eval data is configured
    for batch in evals: ...                           # one deterministic pass; re-iterable; evals.n_targets

Batches are dicts of numpy arrays, shape [global_batch_size / process_count, seq_len]:
`inputs`, `targets`, `segment_ids`, `positions` (int32) and `weights` (float32). Documents are packed with no
padding; `segment_ids` (1.. per document piece, 0 = padding) and `positions` (restarting per segment) let
attention stay inside a document; `weights` is 1 exactly where the target continues the input's document.
The model's vocabulary must cover `tokenizer.vocab_size` ids.

Training text is tokenized once into token shards on disk (`shards.prepare`, the `launch.tokenize` CLI; done
lazily into <workdir>/data_cache when `prepared` / `mixture` name none) and read by row index through grain:
each process packs only its rows of each global batch and the iterator state is a few integers. `mixture`
interleaves several prepared datasets by weight.

With `hf_dataset` and `streaming` set, `build_train_iterator` returns a `StreamingTrainIterator` instead: each
process reads its own part of the stream, documents are tokenized and packed lazily, rows shuffled in seeded
blocks of `shuffle_buffer_rows`; its state (where the current block began, two counters) resumes exactly and
stays a few integers; memory stays bounded.

With no training data configured, the default corpus is the running Python's standard-library source, with a
fixed held-out split for evaluation. Bad input raises `DataError` (a ValueError) or `DataFileNotFoundError`
(a FileNotFoundError and a DataError) with one line naming the path, pattern or field.
"""

from ultrathink_jax.data.config import default_config, validate
from ultrathink_jax.data.errors import DataError, DataFileNotFoundError, TokenizerError
from ultrathink_jax.data.packing import TokenStream, num_rows, pack_documents, pack_row
from ultrathink_jax.data.pipeline import (EvalBatches, TrainIterator, build_eval_iterator, build_tokenizer,
                                          build_train_iterator, eval_source, load_tokens, train_source)
from ultrathink_jax.data.sources import FileSource, HFSource, SourceStats, StdlibCorpus
from ultrathink_jax.data.shards import PreparedDataset, ShardRows, prepare
from ultrathink_jax.data.streaming import StreamingTrainIterator
from ultrathink_jax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "DataError", "DataFileNotFoundError", "EvalBatches", "FileSource", "HFSource", "PreparedDataset", "ShardRows",
    "SourceStats", "StdlibCorpus", "prepare",
    "StreamingTrainIterator", "TokenStream", "Tokenizer", "TokenizerError", "TrainIterator", "build_eval_iterator", "build_tokenizer",
    "build_train_iterator", "default_config", "eval_source", "load_tokenizer", "load_tokens", "num_rows",
    "pack_documents", "pack_row", "train_source", "train_tokenizer", "validate",
]
