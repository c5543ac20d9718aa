"""Pipeline: shuffled/resumable training batches, process sharding, evaluation passes, config entry points."""

import json
import re

import numpy as np
import pytest

from ultrathink_jax.data import (DataError, EvalBatches, TrainIterator, build_eval_iterator, build_tokenizer,
                                 build_train_iterator, default_config, eval_source, train_source, validate)
from ultrathink_jax.data.packing import FIELDS, TokenStream, num_rows

SEQ_LEN, PAD = 4, 0


def _cfg(**overrides):
    cfg = default_config()
    cfg.update(dict(seq_len=SEQ_LEN, global_batch_size=4, read_threads=2, prefetch_buffer_size=2))
    cfg.update(overrides)
    return cfg


def _stream(n_rows=10, doc_len=7):
    """Token i is i + 1 (never PAD), so a row is recognised by its first input: row r starts with r*SEQ_LEN + 1."""
    n = n_rows * SEQ_LEN + 1
    starts = np.arange(0, n, doc_len)
    return TokenStream(np.arange(1, n + 1, dtype=np.int32), starts)


def _row_ids(batch):
    return [(int(x) - 1) // SEQ_LEN if x != PAD else -1 for x in batch["inputs"][:, 0]]


def _train(cfg=None, stream=None, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return TrainIterator(stream or _stream(), {}, cfg or _cfg(), PAD, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        for k in FIELDS:
            assert np.array_equal(x[k], y[k]), f"batch {i} field {k}: rows {_row_ids(x)} vs {_row_ids(y)}"


# ------------------------------------------------------------------------------------------ training batches

def test_train_batches_have_the_documented_fields_shapes_and_dtypes():
    batch = next(_train())
    assert set(batch) == set(FIELDS)
    for k in FIELDS:
        assert batch[k].shape == (4, SEQ_LEN), f"{k}: {batch[k].shape}"
        assert batch[k].dtype == (np.float32 if k == "weights" else np.int32), f"{k}: {batch[k].dtype}"


def test_each_epoch_visits_every_row_once_in_a_new_order():
    it = _train(_cfg(global_batch_size=5))  # 10 rows: two batches per epoch
    epochs = [sum((_row_ids(b) for b in _take(it, 2)), []) for _ in range(3)]
    for e, order in enumerate(epochs):
        assert sorted(order) == list(range(10)), f"epoch {e}: {order}"
    assert epochs[0] != epochs[1] != epochs[2], epochs


def test_shuffle_depends_on_the_seed():
    a = sum((_row_ids(b) for b in _take(_train(_cfg(seed=0)), 2)), [])
    b = sum((_row_ids(b) for b in _take(_train(_cfg(seed=1)), 2)), [])
    assert a != b, a


def test_resumed_iterator_sees_exactly_the_batches_of_an_uninterrupted_run():
    original = _train()  # 10 rows, batch 4: the 8 batches below cross 3 epoch boundaries
    _take(original, 3)
    state = json.loads(json.dumps(original.get_state()))  # must survive a JSON checkpoint
    continued = _take(original, 5)
    resumed = _train()
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 5), continued)


def test_batches_do_not_depend_on_thread_or_buffer_settings():
    a = _take(_train(_cfg(read_threads=1, prefetch_buffer_size=1)), 4)
    b = _take(_train(_cfg(read_threads=4, prefetch_buffer_size=8)), 4)
    _assert_same_batches(a, b)


def test_state_from_different_data_is_rejected():
    state = _train().get_state()
    other = _train(stream=_stream(n_rows=12))
    with pytest.raises(DataError, match="saved for different data"):
        other.set_state(state)


def test_malformed_state_is_rejected():
    with pytest.raises(DataError, match="not a version-1 state"):
        _train().set_state({"next_index": 3})


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_get_disjoint_slices_that_concatenate_to_the_global_batch(process_count):
    cfg = _cfg(global_batch_size=8)
    whole = _take(_train(cfg), 3)
    parts = [_take(_train(cfg, process_index=p, process_count=process_count), 3) for p in range(process_count)]
    for step in range(3):
        for k in FIELDS:
            joined = np.concatenate([parts[p][step][k] for p in range(process_count)])
            assert np.array_equal(joined, whole[step][k]), f"step {step} field {k}"
        ids = [_row_ids(parts[p][step]) for p in range(process_count)]
        assert all(len(i) == 8 // process_count for i in ids), ids


def test_process_index_and_count_default_to_jax():
    import jax

    it = TrainIterator(_stream(), {}, _cfg(), PAD)
    assert jax.process_count() == 1 and it.local_batch_size == 4


def test_global_batch_must_divide_among_processes():
    with pytest.raises(DataError, match="global_batch_size=4 must be divisible by the process count 3"):
        _train(process_index=0, process_count=3)


def test_too_little_training_data_names_the_numbers():
    tiny = TokenStream(np.array([1, 2, 3], np.int32), np.array([0]))
    with pytest.raises(DataError, match="training data has 3 tokens; seq_len=4 needs at least 5"):
        _train(stream=tiny)


# ------------------------------------------------------------------------------------------ evaluation batches

def _eval(stream, cfg=None, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return EvalBatches(stream, {}, cfg or _cfg(), PAD, **kw)


def test_eval_is_one_ordered_pass_keeping_the_final_partial_row_and_batch():
    stream = TokenStream(np.arange(1, 4 * 5 + 3 + 1, dtype=np.int32), np.array([0, 9]))  # 23 tokens
    assert num_rows(23, SEQ_LEN, keep_partial=True) == 6  # 5 full rows + a partial one of 2 targets
    ev = _eval(stream)
    batches = list(ev)
    assert len(ev) == len(batches) == 2
    assert [_row_ids(b) for b in batches] == [[0, 1, 2, 3], [4, 5, -1, -1]]
    assert batches[1]["weights"][1].tolist() == [1, 1, 0, 0], "partial row: 2 real targets then padding"
    assert batches[1]["weights"][2:].sum() == 0 and batches[1]["segment_ids"][2:].sum() == 0
    total = sum(float(b["weights"].sum()) for b in batches)
    assert total == ev.n_targets == 23 - 2, f"scored {total}, n_targets {ev.n_targets}"


def test_eval_is_re_iterable_and_deterministic():
    ev = _eval(_stream())
    _assert_same_batches(list(ev), list(ev))


def test_eval_processes_split_every_batch_including_the_padded_last_one():
    stream = _stream(n_rows=10)
    whole = list(_eval(stream))
    parts = [list(_eval(stream, process_index=p, process_count=2)) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole) == 3
    for step in range(3):
        assert np.array_equal(np.concatenate([parts[0][step]["inputs"], parts[1][step]["inputs"]]),
                              whole[step]["inputs"]), f"step {step}"


# ------------------------------------------------------------------------------------------ entry points

def _write_corpus(tmp_path):
    train = tmp_path / "train.jsonl"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    train.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 30))}) + "\n" for _ in range(60)))
    held_out = tmp_path / "valid.txt"
    held_out.write_text("alpha beta gamma\n\ndelta epsilon")
    return train, held_out


def test_tokenizer_is_trained_saved_in_the_workdir_and_reused_on_resume(tmp_path):
    train, _ = _write_corpus(tmp_path)
    cfg = _cfg(train_files=str(train), vocab_size=300)
    first = build_tokenizer(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    cfg.vocab_size = 280  # a resumed run keeps the tokenizer its checkpoints were trained with
    again = build_tokenizer(cfg, tmp_path / "run")
    assert again.vocab_size == first.vocab_size and again.encode("alpha beta") == first.encode("alpha beta")


def test_configured_tokenizer_path_is_loaded_and_copied_to_the_workdir(tmp_path):
    train, _ = _write_corpus(tmp_path)
    build_tokenizer(_cfg(train_files=str(train), vocab_size=290), tmp_path / "a")
    tok = build_tokenizer(_cfg(train_files=str(train), tokenizer=str(tmp_path / "a" / "tokenizer")), tmp_path / "b")
    assert tok.vocab_size <= 290 and (tmp_path / "b" / "tokenizer" / "tokenizer.json").is_file()


def test_files_config_builds_train_and_eval_iterators_and_caches_tokens(tmp_path):
    train, held_out = _write_corpus(tmp_path)
    cfg = _cfg(train_files=str(train), eval_files=str(held_out), txt_split="paragraph", vocab_size=300,
               seq_len=16, global_batch_size=2)
    tok = build_tokenizer(cfg, tmp_path)
    it = build_train_iterator(cfg, tok, tmp_path, process_index=0, process_count=1)
    assert it.stats["documents"] == 60 and it.stats["tokens"] > 60 * 16, it.stats
    assert next(it)["inputs"].shape == (2, 16)
    ev = build_eval_iterator(cfg, tok, workdir=tmp_path, process_index=0, process_count=1)
    assert ev.stats["documents"] == 2, ev.stats
    assert sum(float(b["weights"].sum()) for b in ev) == ev.n_targets == ev.stats["tokens"] - 2
    cached = sorted((tmp_path / "data_cache").glob("tokens-*.npz"))  # evaluation: in memory, cached
    assert len(cached) == 1, cached
    prepared = sorted((tmp_path / "data_cache").glob("prepared-*/manifest.json"))  # training: token shards
    assert len(prepared) == 1, prepared
    again = build_train_iterator(cfg, tok, tmp_path, process_index=0, process_count=1)
    assert again.stats == it.stats
    _assert_same_batches(_take(again, 3), _take(build_train_iterator(cfg, tok, None, process_index=0,
                                                                    process_count=1), 3))


def test_empty_training_data_fails_tokenizer_training_with_the_path(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    cfg = _cfg(train_files=str(tmp_path / "empty.txt"), txt_split="line")
    with pytest.raises(DataError, match=re.escape(f"no text found in files {tmp_path / 'empty.txt'}")):
        build_tokenizer(cfg, tmp_path / "run")


def test_cache_off_writes_nothing(tmp_path):
    train, _ = _write_corpus(tmp_path)
    cfg = _cfg(train_files=str(train), vocab_size=300, cache=False)
    build_train_iterator(cfg, build_tokenizer(cfg), tmp_path, process_index=0, process_count=1)
    assert not (tmp_path / "data_cache").exists()


def test_changed_training_file_is_re_tokenized_not_served_from_cache(tmp_path):
    train, _ = _write_corpus(tmp_path)
    cfg = _cfg(train_files=str(train), vocab_size=300)
    tok = build_tokenizer(cfg)
    before = build_train_iterator(cfg, tok, tmp_path, process_index=0, process_count=1).stats["documents"]
    with open(train, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    after = build_train_iterator(cfg, tok, tmp_path, process_index=0, process_count=1).stats["documents"]
    assert (before, after) == (60, 61)


def test_eval_files_argument_overrides_the_config_and_none_without_eval_data(tmp_path):
    train, held_out = _write_corpus(tmp_path)
    cfg = _cfg(train_files=str(train), vocab_size=300)
    tok = build_tokenizer(cfg)
    assert build_eval_iterator(cfg, tok, process_index=0, process_count=1) is None
    ev = build_eval_iterator(cfg, tok, files=str(held_out), process_index=0, process_count=1)
    assert ev.stats["documents"] == 1  # txt_split "file": the whole file is one document


def test_eval_max_chars_caps_the_eval_source(tmp_path):
    _, held_out = _write_corpus(tmp_path)
    cfg = _cfg(eval_files=str(held_out), txt_split="paragraph", eval_max_chars=5, vocab_size=300)
    ev = build_eval_iterator(cfg, build_tokenizer(_cfg(train_files=str(held_out))), process_index=0,
                             process_count=1)
    assert ev.stats["documents"] == 1, ev.stats


def test_hugging_face_config_builds_train_and_eval_from_its_splits(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"body": f"train doc {i} " * 5}) + "\n" for i in range(20)))
    (d / "test.jsonl").write_text(json.dumps({"body": "held out doc"}) + "\n")
    cfg = _cfg(hf_dataset=str(d), hf_split="train", hf_eval_split="test", text_column="body", streaming=True,
               max_chars=300, vocab_size=300)
    tok = build_tokenizer(cfg)
    it = build_train_iterator(cfg, tok, process_index=0, process_count=1)
    # Documents 0..9 have 60 characters: the 5th reaches max_chars=300 and ends the stream.
    assert it.stats["documents"] == 5 and it.stats["chars"] == 300, it.stats
    ev = build_eval_iterator(cfg, tok, process_index=0, process_count=1)
    assert ev.stats["documents"] == 1


def test_default_config_uses_the_stdlib_corpus_with_its_held_out_split(tmp_path):
    cfg = _cfg(default_corpus_max_chars=60_000, eval_max_chars=20_000, vocab_size=400, seq_len=32)
    tok = build_tokenizer(cfg, tmp_path)
    it = build_train_iterator(cfg, tok, tmp_path, process_index=0, process_count=1)
    assert it.stats["chars"] >= 60_000 and it.stats["tokens"] > 10_000, it.stats
    ev = build_eval_iterator(cfg, tok, workdir=tmp_path, process_index=0, process_count=1)
    assert 20_000 <= ev.stats["chars"] and ev.n_targets > 0, ev.stats


def test_heldout_fraction_sets_the_default_eval_share():
    small, large = eval_source(_cfg(heldout_fraction=0.01)), eval_source(_cfg(heldout_fraction=0.05))
    assert set(small.files()) < set(large.files()), "a larger fraction only adds held-out files"
    train = train_source(_cfg(heldout_fraction=0.05)).files()
    assert not set(train) & set(large.files())


# ------------------------------------------------------------------------------------------ config

def test_default_config_is_valid():
    validate(default_config())


@pytest.mark.parametrize("field,value,message", [
    ("seq_len", 0, "seq_len=0 must be positive"),
    ("global_batch_size", -1, "global_batch_size=-1 must be positive"),
    ("vocab_size", 100, "vocab_size=100 must be >= 257"),
    ("txt_split", "page", "txt_split='page' must be one of"),
    ("heldout_fraction", 1.0, "heldout_fraction=1.0 must be in (0, 1)"),
    ("max_chars", -5, "max_chars=-5 must be >= 0"),
    ("read_threads", 0, "read_threads=0 must be >= 1"),
    ("hf_eval_split", "test", "hf_eval_split='test' is set but hf_dataset is empty"),
    ("streaming", True, "streaming=True is set but hf_dataset is empty: only a Hugging Face dataset is streamed"),
])
def test_bad_config_value_names_the_field(field, value, message):
    cfg = default_config()
    cfg[field] = value
    with pytest.raises(DataError, match=re.escape(message)):
        validate(cfg)


def test_train_files_and_hf_dataset_together_are_ambiguous():
    cfg = default_config()
    cfg.update(dict(train_files="a.txt", hf_dataset="wikitext"))
    with pytest.raises(DataError, match="train_files='a.txt' and hf_dataset are both set"):
        validate(cfg)


def test_unknown_config_field_is_named():
    cfg = default_config()
    cfg.seq_length = 5
    with pytest.raises(DataError, match=r"unknown field\(s\) \['seq_length'\]"):
        validate(cfg)
