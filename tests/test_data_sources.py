"""Text sources: embedded stdlib corpus, local .txt/.jsonl/.parquet, Hugging Face datasets, bad input."""

import json
import os
import re

import pytest

from conftest import TEST_DATA
from ultrathink_jax.data.errors import DataError, DataFileNotFoundError
from ultrathink_jax.data.sources import FileSource, HFSource, StdlibCorpus, decode_utf8



# ------------------------------------------------------------------------------------------ stdlib corpus

@pytest.fixture(scope="module")
def stdlib_split():
    return StdlibCorpus("train", 0.02).files(), StdlibCorpus("eval", 0.02).files()


def test_stdlib_corpus_is_non_empty_python_source(stdlib_split):
    train, held_out = stdlib_split
    assert len(train) > 100 and len(held_out) > 0, (len(train), len(held_out))
    assert all(p.suffix == ".py" for p in train + held_out)


def test_stdlib_split_is_disjoint_and_about_the_held_out_fraction(stdlib_split):
    train, held_out = stdlib_split
    assert not set(train) & set(held_out)
    share = len(held_out) / (len(train) + len(held_out))
    assert 0.005 < share < 0.05, f"held-out share {share:.3f} for heldout_fraction 0.02"


def test_stdlib_split_is_fixed_and_independent_of_the_char_cap(stdlib_split):
    _, held_out = stdlib_split
    assert StdlibCorpus("eval", 0.02, max_chars=1000).files() == held_out
    first = next(iter(StdlibCorpus("eval", 0.02)))
    assert first == held_out[0].read_text(encoding="utf-8", errors="replace")


def test_stdlib_char_cap_stops_after_the_document_that_reaches_it():
    corpus = StdlibCorpus("train", 0.02, max_chars=50_000)
    docs = list(corpus)
    assert sum(map(len, docs)) >= 50_000 > sum(map(len, docs[:-1])), [len(d) for d in docs]
    assert corpus.stats.chars == sum(map(len, docs)) and corpus.stats.documents == len(docs)


def test_stdlib_corpus_rejects_a_bad_split_name():
    with pytest.raises(DataError, match="split='test' must be 'train' or 'eval'"):
        StdlibCorpus("test", 0.02)


# ------------------------------------------------------------------------------------------ local files

def test_txt_is_one_document_per_file_by_default(tmp_path):
    (tmp_path / "a.txt").write_text("first file\n\nsecond paragraph")
    (tmp_path / "b.txt").write_text("other file")
    assert list(FileSource(str(tmp_path / "*.txt"))) == ["first file\n\nsecond paragraph", "other file"]


def test_txt_paragraph_and_line_splitting(tmp_path):
    (tmp_path / "a.txt").write_text("p1 l1\np1 l2\n\n  \np2\n\n\n")
    assert list(FileSource(str(tmp_path / "a.txt"), txt_split="paragraph")) == ["p1 l1\np1 l2", "p2"]
    assert list(FileSource(str(tmp_path / "a.txt"), txt_split="line")) == ["p1 l1", "p1 l2", "p2"]


def test_jsonl_reads_the_text_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"body": f"doc {i}", "id": i}) for i in range(3)) + "\n\n")
    assert list(FileSource(str(f), text_column="body")) == ["doc 0", "doc 1", "doc 2"]


def test_parquet_reads_the_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "beta"], "n": [1, 2, 3]}), f)
    assert list(FileSource(str(f))) == ["alpha", "beta"]


def test_several_patterns_and_a_directory_are_read_in_order_without_duplicates(tmp_path):
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "b.jsonl").write_text('{"text": "B"}\n')
    source = FileSource(f"{tmp_path / 'a.txt'}, {tmp_path}")
    assert list(source) == ["A", "B"]
    assert source.stats.files == 2


def test_max_chars_caps_a_file_source(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(["x" * 10] * 100))
    assert len(list(FileSource(str(tmp_path / "a.txt"), txt_split="line", max_chars=35))) == 4


def test_tinyshakespeare_paragraphs_are_read_whole():
    source = FileSource(str(TEST_DATA / "tinyshakespeare_head.txt"), txt_split="paragraph")
    docs = list(source)
    assert len(docs) == 200 and docs[0] == "First Citizen:\nBefore we proceed any further, hear me speak.", docs[:2]
    assert docs[1] == "All:\nSpeak, speak." and all(d and "\n\n" not in d for d in docs)
    assert source.stats.invalid_utf8 == 0


# ------------------------------------------------------------------------------------------ invalid UTF-8

def test_decode_utf8_replaces_like_errors_replace_and_counts():
    data = "ok é ".encode() + b"\xff\xfe bad \xc3"
    text, bad = decode_utf8(data)
    assert text == data.decode("utf-8", errors="replace")
    assert bad == 3 == text.count("\ufffd"), (bad, text)


def test_invalid_utf8_in_txt_is_replaced_and_counted_not_fatal(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"good \xff text")
    (tmp_path / "b.txt").write_bytes(b"\xc3\x28 again")
    source = FileSource(str(tmp_path / "*.txt"))
    assert list(source) == ["good \ufffd text", "\ufffd( again"]
    assert source.stats.invalid_utf8 == 2


def test_invalid_utf8_in_jsonl_is_replaced_and_counted(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    source = FileSource(str(tmp_path / "a.jsonl"))
    assert list(source) == ["caf\ufffd"] and source.stats.invalid_utf8 == 1


# ------------------------------------------------------------------------------------------ Hugging Face

@pytest.fixture()
def hf_dir(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    d = tmp_path / "my_dataset"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"content": f"train {i}"}) + "\n" for i in range(5)))
    (d / "validation.jsonl").write_text(json.dumps({"content": "held out"}) + "\n")
    return d


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_dataset_from_a_local_directory(hf_dir, streaming):
    source = HFSource(str(hf_dir), split="train", text_column="content", streaming=streaming)
    assert list(source) == [f"train {i}" for i in range(5)]
    assert list(HFSource(str(hf_dir), split="validation", text_column="content")) == ["held out"]


def test_hf_dataset_missing_column_lists_the_columns(hf_dir):
    with pytest.raises(DataError, match=r"has no column 'text' \(columns: \['content'\]\)"):
        list(HFSource(str(hf_dir), split="train", text_column="text"))


def test_hf_dataset_config_name_is_passed_to_load_dataset(hf_dir):
    with pytest.raises(DataError, match=re.escape(f"cannot load hugging face dataset {hf_dir}/nope split=train")):
        list(HFSource(str(hf_dir), config="nope", split="train", text_column="content"))


def test_hf_dataset_unknown_split_is_one_clear_error(hf_dir):
    with pytest.raises(DataError, match=re.escape(f"cannot load hugging face dataset {hf_dir} split=nope")):
        list(HFSource(str(hf_dir), split="nope", text_column="content"))


# ------------------------------------------------------------------------------------------ bad input

def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=re.escape(f"data file does not exist: {tmp_path / 'none.txt'}")):
        FileSource(str(tmp_path / "none.txt"))


def test_glob_matching_nothing_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "*.jsonl")
    with pytest.raises(DataFileNotFoundError, match=re.escape(f"data pattern matches no files: {pattern}")):
        FileSource(pattern)


def test_empty_file_names_the_source(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=re.escape(f"no text found in files {tmp_path / 'empty.txt'}")):
        list(FileSource(str(tmp_path / "empty.txt")))


def test_unsupported_file_type_is_named(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"unsupported data file type '\.csv'"):
        FileSource(str(tmp_path / "x.csv"))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=re.escape(f"{f}:2: invalid JSON")):
        list(FileSource(str(f)))


def test_jsonl_record_without_the_field_names_file_line_and_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=re.escape(f"{f}:1: record has no field 'text'")):
        list(FileSource(str(f)))


def test_parquet_without_the_column_lists_the_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["x"]}), f)
    with pytest.raises(DataError, match=r"has no column 'text' \(columns: \['body'\]\)"):
        list(FileSource(str(f)))


def test_corrupt_parquet_names_the_file(tmp_path):
    f = tmp_path / "d.parquet"
    f.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=re.escape(f"cannot read parquet file {f}")):
        list(FileSource(str(f)))


def test_hf_dataset_token_cache_is_rebuilt_when_its_files_change(hf_dir, tmp_path):
    from ultrathink_jax.data import load_tokens, train_tokenizer

    tokenizer = train_tokenizer(["train 0 1 2 3 4 edited"], 300)
    before, _ = load_tokens(HFSource(str(hf_dir), split="train", text_column="content"), tokenizer, tmp_path / "c")
    data = hf_dir / "train.jsonl"
    data.write_text(json.dumps({"content": "edited"}) + "\n")
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))  # a new mtime, even on coarse clocks
    after, _ = load_tokens(HFSource(str(hf_dir), split="train", text_column="content"), tokenizer, tmp_path / "c")
    assert after.tokens.tolist() == tokenizer.encode("edited") + [tokenizer.eos_id], \
        f"same dataset name, edited file: got the cached tokens {after.tokens.tolist()} (before: {before.n_tokens})"
