"""Streamed Hugging Face training data: rows as the in-memory packing, epochs, shuffle buffer, exact resume,
process slices, bounded memory, clear errors, and a trainer run that resumes exactly."""

import json
import random

import numpy as np
import pytest

from ultrathink_jax.data import (DataError, HFSource, TrainIterator, build_train_iterator, default_config,
                                 load_tokens, num_rows, train_tokenizer, validate)
from ultrathink_jax.data.packing import FIELDS, TokenStream, pack_row
from ultrathink_jax.data.streaming import StreamingTrainIterator

SEQ_LEN, BATCH, N_DOCS = 8, 4, 40
WORDS = "the cat sat on a mat and a dog ran to the park while birds sang in old trees".split()


def _docs(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def _write_dataset(directory, docs, column="text"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.jsonl").write_text("".join(json.dumps({column: d}) + "\n" for d in docs))
    return directory


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_docs(N_DOCS), 300)


@pytest.fixture()
def dataset(tmp_path):
    return _write_dataset(tmp_path / "ds", _docs(N_DOCS))


def _cfg(dataset, **overrides):
    cfg = default_config()
    cfg.update(dict(hf_dataset=str(dataset), streaming=True, seq_len=SEQ_LEN, global_batch_size=BATCH,
                    shuffle_buffer_rows=1))
    cfg.update(overrides)
    return cfg


def _stream_iter(dataset, tokenizer, process_index=0, process_count=1, **overrides):
    cfg = _cfg(dataset, **overrides)
    return build_train_iterator(cfg, tokenizer, process_index=process_index, process_count=process_count)


def _in_memory_stream(dataset, tokenizer, max_chars=0):
    return load_tokens(HFSource(str(dataset), split="train", max_chars=max_chars), tokenizer)[0]


def _rows(batches):
    """Batches -> list of per-row dicts."""
    return [{k: b[k][i] for k in FIELDS} for b in batches for i in range(len(b["inputs"]))]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_rows_equal(got, want, what):
    for r, (g, w) in enumerate(zip(got, want)):
        for k in FIELDS:
            assert np.array_equal(g[k], w[k]), f"{what}: row {r} field {k}: got {g[k]}, expected {w[k]}"


def _doubled(stream):
    n = stream.n_tokens
    return TokenStream(np.concatenate([stream.tokens, stream.tokens]),
                       np.concatenate([stream.doc_starts, stream.doc_starts + n]))


# ------------------------------------------------------------------------------------------ rows and epochs

def test_hf_streaming_config_builds_the_streaming_iterator_with_documented_batches(dataset, tokenizer):
    it = _stream_iter(dataset, tokenizer)
    assert isinstance(it, StreamingTrainIterator)
    batch = next(it)
    assert set(batch) == set(FIELDS)
    for k in FIELDS:
        assert batch[k].shape == (BATCH, SEQ_LEN), f"{k}: {batch[k].shape}"
        assert batch[k].dtype == (np.float32 if k == "weights" else np.int32), f"{k}: {batch[k].dtype}"


def test_unbuffered_stream_rows_equal_the_in_memory_packed_rows(dataset, tokenizer):
    stream = _in_memory_stream(dataset, tokenizer)
    n_rows = num_rows(stream.n_tokens, SEQ_LEN, keep_partial=False)
    got = _rows(_take(_stream_iter(dataset, tokenizer), -(-n_rows // BATCH)))[:n_rows]
    want = [pack_row(stream, r, SEQ_LEN, tokenizer.pad_id) for r in range(n_rows)]
    _assert_rows_equal(got, want, f"first epoch of {n_rows} rows")


def test_every_stream_token_is_a_target_once_per_epoch_weighted_zero_only_at_document_starts(dataset, tokenizer):
    stream = _in_memory_stream(dataset, tokenizer)
    n_rows = num_rows(stream.n_tokens, SEQ_LEN, keep_partial=False)
    rows = _rows(_take(_stream_iter(dataset, tokenizer), -(-n_rows // BATCH)))[:n_rows]
    targets = np.concatenate([r["targets"] for r in rows])
    weights = np.concatenate([r["weights"] for r in rows])
    covered = n_rows * SEQ_LEN
    assert np.array_equal(targets, stream.tokens[1:covered + 1].astype(np.int32)), "targets skip or repeat tokens"
    starts = set(stream.doc_starts.tolist())
    expected_weights = np.array([0.0 if t in starts else 1.0 for t in range(1, covered + 1)], np.float32)
    zero_got, zero_want = int((weights == 0).sum()), int((expected_weights == 0).sum())
    assert np.array_equal(weights, expected_weights), f"{zero_got} zero weights, expected {zero_want}"


def test_next_epoch_reopens_the_stream_and_the_carry_flows_across_the_seam(dataset, tokenizer):
    stream = _doubled(_in_memory_stream(dataset, tokenizer))
    n_rows = num_rows(stream.n_tokens, SEQ_LEN, keep_partial=False)
    it = _stream_iter(dataset, tokenizer)
    got = _rows(_take(it, n_rows // BATCH))
    want = [pack_row(stream, r, SEQ_LEN, tokenizer.pad_id) for r in range(len(got))]
    _assert_rows_equal(got, want, "two epochs")
    assert it.stats["epoch"] == 1, it.stats


def test_max_chars_ends_each_epoch_at_the_cap(dataset, tokenizer):
    cap = 120
    stream = _doubled(_in_memory_stream(dataset, tokenizer, max_chars=cap))
    n_rows = num_rows(stream.n_tokens, SEQ_LEN, keep_partial=False)
    got = _rows(_take(_stream_iter(dataset, tokenizer, max_chars=cap), n_rows // BATCH))
    want = [pack_row(stream, r, SEQ_LEN, tokenizer.pad_id) for r in range(len(got))]
    assert len(got) >= 4, f"only {len(got)} rows compared"
    _assert_rows_equal(got, want, f"two epochs capped at {cap} chars")


def test_shuffle_buffer_reorders_rows_by_seed(dataset, tokenizer):
    def first_inputs(**kw):
        return np.concatenate([b["inputs"][:, 0] for b in _take(_stream_iter(dataset, tokenizer, **kw), 4)])

    ordered = first_inputs()
    a, again, b = (first_inputs(shuffle_buffer_rows=8, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a, again), "same seed gave different orders"
    assert not np.array_equal(a, ordered), "buffered rows came out in stream order"
    assert not np.array_equal(a, b), "seeds 0 and 1 gave the same order"


# ------------------------------------------------------------------------------------------ resume

def test_resumed_stream_sees_exactly_the_batches_of_an_uninterrupted_run(dataset, tokenizer, monkeypatch):
    from ultrathink_jax.data import streaming

    monkeypatch.setattr(streaming, "_CHUNK_DOCS", 4)  # so the state falls mid-epoch: resume must skip documents
    full = _stream_iter(dataset, tokenizer, shuffle_buffer_rows=8)
    _take(full, 3)
    state = json.loads(json.dumps(full.get_state()))  # what the trainer checkpoints
    start = state["block_start"]
    assert 0 < start["documents"] < N_DOCS, f"state after {start['documents']} of {N_DOCS} documents"
    expected = _take(full, 12)  # 12 batches of 4 rows: crosses into the next epoch
    resumed = _stream_iter(dataset, tokenizer, shuffle_buffer_rows=8)
    resumed.set_state(state)
    got = _take(resumed, 12)
    _assert_rows_equal(_rows(got), _rows(expected), "resumed vs uninterrupted")
    assert full.stats["epoch"] >= 1, f"the comparison never crossed an epoch: {full.stats}"


def test_state_from_other_settings_or_the_in_memory_iterator_is_rejected(dataset, tokenizer):
    state = _stream_iter(dataset, tokenizer).get_state()
    with pytest.raises(DataError, match="saved for different data"):
        _stream_iter(dataset, tokenizer, seed=3).set_state(state)
    in_memory = TrainIterator(TokenStream(np.arange(1, 50, dtype=np.int32), np.array([0])), {},
                              _cfg(dataset, streaming=False), 0, process_index=0, process_count=1)
    with pytest.raises(DataError, match="is not a version-2 hf-stream state"):
        _stream_iter(dataset, tokenizer).set_state(in_memory.get_state())


# ------------------------------------------------------------------------------------------ processes, memory

@pytest.mark.parametrize("process_count", [2, 4])
def test_each_process_reads_only_its_own_part_of_the_stream(dataset, tokenizer, process_count):
    parts = [_stream_iter(dataset, tokenizer, p, process_count, shuffle_buffer_rows=8) for p in range(process_count)]
    rows = [{tuple(r) for b in _take(it, 3) for r in b["inputs"]} for it in parts]
    for p, it in enumerate(parts):
        assert next(it)["inputs"].shape == (4 // process_count, SEQ_LEN)
        assert it.stats["documents"] < N_DOCS, f"process {p} read {it.stats['documents']} of {N_DOCS} documents"
        for q in range(p):
            assert not rows[p] & rows[q], f"processes {q} and {p} produced the same rows"


def test_state_stays_a_few_integers_whatever_the_buffer_size(tmp_path, tokenizer):
    from ultrathink_jax.data import streaming

    n_docs = 3 * streaming._CHUNK_DOCS
    sizes = []
    for buffer_rows in (2, 64):
        it = _stream_iter(_write_dataset(tmp_path / f"big{buffer_rows}", _docs(n_docs)), tokenizer,
                          shuffle_buffer_rows=buffer_rows)
        _take(it, 2)
        state = it.get_state()
        assert len(state["block_start"]["carry"]) <= SEQ_LEN, state
        sizes.append(len(json.dumps(state)))
    assert max(sizes) < 1000 and abs(sizes[0] - sizes[1]) < 50, sizes


# ------------------------------------------------------------------------------------------ errors and config

def test_missing_text_column_is_one_data_error_at_build_time(dataset, tokenizer):
    with pytest.raises(DataError, match=r"has no column 'body' \(columns: \['text'\]\)"):
        _stream_iter(dataset, tokenizer, text_column="body")


def test_missing_dataset_is_one_data_error_naming_it(tmp_path, tokenizer):
    with pytest.raises(DataError, match=f"cannot load hugging face dataset {tmp_path / 'nope'}"):
        _stream_iter(tmp_path / "nope", tokenizer)


def test_dataset_of_only_empty_documents_says_no_text_found(tmp_path, tokenizer):
    empty = _write_dataset(tmp_path / "empty", ["", ""])
    with pytest.raises(DataError, match=f"no text found in hugging face dataset {empty}"):
        _stream_iter(empty, tokenizer)


@pytest.mark.parametrize("field,value", [("read_threads", 8), ("prefetch_buffer_size", 1)])
def test_reader_settings_a_stream_cannot_use_are_warned_about_by_name(dataset, tokenizer, caplog, field, value):
    with caplog.at_level("WARNING", logger="ultrathink_jax.data.pipeline"):
        _stream_iter(dataset, tokenizer, **{field: value})
    assert f"{field}={value} not used for the training stream" in caplog.text, caplog.text


def test_default_reader_settings_give_a_stream_no_warning(dataset, tokenizer, caplog):
    with caplog.at_level("WARNING", logger="ultrathink_jax.data.pipeline"):
        _stream_iter(dataset, tokenizer)
    assert "not used for the training stream" not in caplog.text, caplog.text


def test_shuffle_buffer_rows_must_be_positive(dataset):
    with pytest.raises(DataError, match=r"shuffle_buffer_rows=0 must be >= 1"):
        validate(_cfg(dataset, shuffle_buffer_rows=0))


# ------------------------------------------------------------------------------------------ trainer

def test_trainer_on_a_streamed_dataset_resumes_with_the_uninterrupted_losses(tmp_path):
    from test_train_fixtures import tiny_config, write_corpus
    from ultrathink_jax.train import train

    train_txt, _ = write_corpus(tmp_path / "corpus", n_train_docs=40)
    docs = [p for p in train_txt.read_text().split("\n\n") if p.strip()]
    ds = _write_dataset(tmp_path / "stream", docs)
    config = tiny_config(train_txt, **{"train.steps": 5, "data.shuffle_buffer_rows": 8})
    config.data.train_files = ""
    config.data.hf_dataset, config.data.streaming = str(ds), True
    full = train(config, tmp_path / "full")
    first = train(config, tmp_path / "split", until_step=3)
    second = train(config, tmp_path / "split")
    assert second.start_step == 3
    resumed = {**first.losses, **second.losses}
    mismatches = {s: (resumed.get(s), full.losses[s]) for s in full.losses if resumed.get(s) != full.losses[s]}
    assert sorted(full.losses) == [1, 2, 3, 4, 5] and not mismatches, (
        f"per-step losses differ after resume (resumed, uninterrupted): {mismatches}")
