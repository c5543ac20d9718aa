"""Prepared token shards (tokenize once, read by index) and weighted mixtures of them."""

import json

import numpy as np
import pytest

from launch import tokenize as tokenize_cli
from ultrathink_jax.data import DataError, FileSource, TrainIterator, build_train_iterator, default_config, train_tokenizer
from ultrathink_jax.data.packing import pack_documents, pack_row
from ultrathink_jax.data.shards import MANIFEST, PreparedDataset, ShardRows, prepare
from ultrathink_jax.data.sources import TextSource


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["alpha beta gamma delta " * 50, "one two three four five " * 50], 300)


def _write_docs(path, word, n):
    path.write_text("\n\n".join(f"{word} {i} " + f"{word} " * (5 + i % 7) for i in range(n)) + "\n")
    return path


def _cfg(**kw):
    cfg = default_config()
    cfg.update(dict(seq_len=8, global_batch_size=4, read_threads=1, prefetch_buffer_size=2))
    cfg.update(kw)
    return cfg


def test_shards_in_worker_processes_hold_every_document_of_the_source(tmp_path, tokenizer):
    source = FileSource(str(_write_docs(tmp_path / "a.txt", "alpha", 300)), txt_split="paragraph")
    manifest = prepare(source, tokenizer, tmp_path / "out", workers=2, shard_chars=2000)
    docs = list(source)
    assert len(manifest["shards"]) > 2 and manifest["documents"] == len(docs)
    assert manifest["sources"][0]["documents"] == len(docs) and manifest["sources"][0]["content_sha256"]
    whole = pack_documents(tokenizer.encode_batch(docs), tokenizer.eos_id, tokenizer.vocab_size)
    read = PreparedDataset(tmp_path / "out")
    assert np.array_equal(np.concatenate([s.tokens for s in read.streams]), whole.tokens)
    assert read.stats["tokens"] == whole.n_tokens
    rows = ShardRows(read.streams, 8, tokenizer.pad_id)
    first = read.streams[1]
    got, want = rows(int(rows.first[1]) + 2), pack_row(first, 2, 8, tokenizer.pad_id)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_a_crash_while_tokenizing_leaves_no_manifest_and_a_rerun_completes(tmp_path, tokenizer):
    class Crashing(TextSource):
        def describe(self):
            return "crashing source"

        def _documents(self, stats):
            for i in range(50):
                yield f"alpha {i} " * 20
            raise OSError("disk vanished")

    with pytest.raises(OSError):
        prepare(Crashing(), tokenizer, tmp_path / "out", workers=0, shard_chars=300)
    assert list((tmp_path / "out").glob("shard-*.tokens.npy")) and not (tmp_path / "out" / MANIFEST).exists()
    with pytest.raises(DataError, match="no manifest|not a prepared dataset"):
        PreparedDataset(tmp_path / "out")
    source = FileSource(str(_write_docs(tmp_path / "a.txt", "alpha", 20)), txt_split="paragraph")
    manifest = prepare(source, tokenizer, tmp_path / "out", workers=0, shard_chars=300)
    assert manifest["documents"] == 20 and len(list((tmp_path / "out").glob("shard-*.tokens.npy"))) == len(
        manifest["shards"])


def _mixture(tmp_path, tokenizer):
    dirs = []
    for word in ("alpha", "one"):
        source = FileSource(str(_write_docs(tmp_path / f"{word}.txt", word, 200)), txt_split="paragraph")
        prepare(source, tokenizer, tmp_path / word, workers=0)
        dirs.append(str(tmp_path / word))
    return f"{dirs[0]}:0.7,{dirs[1]}:0.3"


def test_a_mixture_realises_its_weights_within_two_percent_and_resumes_exactly(tmp_path, tokenizer):
    mixture = _mixture(tmp_path, tokenizer)
    cfg = _cfg(mixture=mixture, global_batch_size=100)
    it = build_train_iterator(cfg, tokenizer, process_index=0, process_count=1)
    batches = [next(it) for _ in range(100)]  # 10k rows
    from_alpha = np.mean(["alpha" in tokenizer.decode(row) for b in batches for row in b["inputs"]])
    assert abs(from_alpha - 0.7) <= 0.02, from_alpha

    again = build_train_iterator(cfg, tokenizer, process_index=0, process_count=1)
    assert all(np.array_equal(next(again)["inputs"], b["inputs"]) for b in batches[:3])  # deterministic by seed
    state = json.loads(json.dumps(again.get_state()))
    assert len(json.dumps(state)) < 400, state
    resumed = build_train_iterator(cfg, tokenizer, process_index=0, process_count=1)
    resumed.set_state(state)
    assert all(np.array_equal(next(resumed)["inputs"], b["inputs"]) for b in batches[3:6])
    other_seed = build_train_iterator(_cfg(mixture=mixture, global_batch_size=100, seed=1), tokenizer,
                                      process_index=0, process_count=1)
    assert not np.array_equal(next(other_seed)["inputs"], batches[0]["inputs"])


def test_processes_split_each_global_batch_of_a_prepared_dataset(tmp_path, tokenizer):
    prepare(FileSource(str(_write_docs(tmp_path / "a.txt", "alpha", 50)), txt_split="paragraph"), tokenizer,
            tmp_path / "p", workers=0)
    whole = next(build_train_iterator(_cfg(prepared=str(tmp_path / "p")), tokenizer, process_index=0,
                                      process_count=1))
    parts = [next(build_train_iterator(_cfg(prepared=str(tmp_path / "p")), tokenizer, process_index=i,
                                       process_count=2)) for i in range(2)]
    assert np.array_equal(np.concatenate([p["inputs"] for p in parts]), whole["inputs"])


def test_a_prepared_dataset_of_another_tokenizer_is_refused(tmp_path, tokenizer):
    prepare(FileSource(str(_write_docs(tmp_path / "a.txt", "alpha", 5)), txt_split="paragraph"), tokenizer,
            tmp_path / "p", workers=0)
    other = train_tokenizer(["completely different text " * 30], 280)
    with pytest.raises(DataError, match="another tokenizer"):
        build_train_iterator(_cfg(prepared=str(tmp_path / "p")), other, process_index=0, process_count=1)


@pytest.mark.parametrize("args, message", [
    (["--config.data.mixture=onlyone:1"], "has one dataset"),
    (["--config.data.mixture=a:1,b:x"], "must be DIR:WEIGHT"),
    (["--config.data.tokenize_workers=-1"], "tokenize_workers=-1 must be >= 0"),
    (["--config.data.train_files=/no/such/file.txt"], "data file does not exist"),
])
def test_tokenize_cli_bad_input_is_one_line(capsys, tmp_path, args, message):
    assert tokenize_cli.main([f"--out={tmp_path / 'o'}", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("launch.tokenize: error: ") and message in err[0], err
