"""Tokenizer: the shipped GPT-2 tokenizer (and the original files, rebuilt from it), trained byte-level BPE,
save -> AutoTokenizer reload, clear errors."""

import hashlib
import json
import re

import pytest

from ultrathink_jax.data.errors import DataFileNotFoundError, TokenizerError
from ultrathink_jax.data.tokenizer import BUILTIN, ENDOFTEXT, load_tokenizer, train_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "Unicode: naïve café, 日本語, emoji 🙂 and tabs\tand\nnewlines.",
] * 20
SENTENCE = "Hello world! The fox said: naïve 日本語 🙂\n    return x"


@pytest.fixture(scope="module")
def trained():
    return train_tokenizer(TEXTS, vocab_size=400)


def test_shipped_gpt2_tokenizer_has_the_gpt2_vocabulary_and_eos():
    tok = load_tokenizer("builtin:gpt2")
    assert tok.vocab_size == 50257, tok.vocab_size
    assert tok.eos_id == 50256 and tok.eos_token == ENDOFTEXT
    assert tok.bos_id == tok.pad_id == 50256
    assert tok.encode("Hello world") == [15496, 995], tok.encode("Hello world")
    assert tok.decode(tok.encode(SENTENCE)) == SENTENCE


def test_shipped_gpt2_directory_loads_in_transformers_with_the_same_ids():
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(BUILTIN["gpt2"]))
    ids = hf(SENTENCE)["input_ids"]
    assert ids and ids == load_tokenizer("builtin:gpt2").encode(SENTENCE), ids
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (50256, 50256, 50256)


def test_unknown_builtin_tokenizer_names_the_shipped_ones():
    with pytest.raises(TokenizerError, match=r"unknown built-in tokenizer 'builtin:gpt3'; shipped: \['builtin:gpt2'\]"):
        load_tokenizer("builtin:gpt3")


# sha256 of GPT-2's original vocab.json and merges.txt (ultrathink_jax/assets/gpt2_tokenizer/README.md)
GPT2_SHA256 = {"vocab.json": "3ba3c3109ff33976c4bd966589c11ee14fcaa1f4c9e5e154c2ed7f99d80709e7",
               "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}


@pytest.fixture(scope="module")
def gpt2_originals(tmp_path_factory):
    """GPT-2's vocab.json and merges.txt rebuilt from the shipped tokenizer.json, byte for byte (sha256 checked):
    the shipped tokenizer holds exactly the original vocabulary and merges, and the originals need not ship."""
    model = json.loads((BUILTIN["gpt2"] / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    files = {"vocab.json": json.dumps(model["vocab"], separators=(",", ":"), ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in model["merges"])}
    out = tmp_path_factory.mktemp("gpt2")
    for name, text in files.items():
        (out / name).write_bytes(text.encode("utf-8"))
    return out


def test_shipped_gpt2_tokenizer_holds_the_original_vocab_and_merges_files(gpt2_originals):
    assert {n: hashlib.sha256((gpt2_originals / n).read_bytes()).hexdigest() for n in GPT2_SHA256} == GPT2_SHA256


def test_shipped_gpt2_tokenizer_encodes_as_the_original_vocab_and_merges_files(gpt2_originals):
    gpt2 = gpt2_originals
    original = load_tokenizer(f"{gpt2 / 'vocab.json'},{gpt2 / 'merges.txt'}")
    text = SENTENCE + " " + " ".join(TEXTS[:3]) + ENDOFTEXT
    assert original.encode(text) == load_tokenizer("builtin:gpt2").encode(text)
    assert original.encode(text) == load_tokenizer(gpt2).encode(text)  # the directory form of the same files


def test_gpt2_saved_tokenizer_reloads_in_transformers_with_the_same_ids(tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer("builtin:gpt2")
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf(SENTENCE)["input_ids"] == tok.encode(SENTENCE)
    assert hf.eos_token_id == 50256


def test_trained_bpe_round_trips_text_exactly(trained):
    ids = trained.encode(SENTENCE)
    assert trained.decode(ids) == SENTENCE
    assert max(ids) < trained.vocab_size


def test_trained_bpe_has_endoftext_as_eos_and_respects_the_vocab_size(trained):
    assert trained.backend.id_to_token(trained.eos_id) == ENDOFTEXT
    assert 257 <= trained.vocab_size <= 400, trained.vocab_size
    assert trained.encode(ENDOFTEXT) == [trained.eos_id], "the special token is one id, as in Hugging Face"


def test_encode_batch_equals_encoding_one_by_one(trained):
    assert trained.encode_batch(TEXTS[:3]) == [trained.encode(t) for t in TEXTS[:3]]


def test_saved_tokenizer_reloads_in_transformers_with_the_same_ids_and_special_tokens(trained, tmp_path):
    from transformers import AutoTokenizer

    trained.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["eos_token"] == ENDOFTEXT
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = hf(SENTENCE)["input_ids"]
    assert ids == trained.encode(SENTENCE), f"transformers {ids[:10]}... vs ours {trained.encode(SENTENCE)[:10]}..."
    assert hf.decode(ids) == SENTENCE
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (trained.eos_id,) * 3


def test_saved_tokenizer_reloads_with_our_loader(trained, tmp_path):
    trained.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(SENTENCE) == trained.encode(SENTENCE)
    assert (again.vocab_size, again.eos_id) == (trained.vocab_size, trained.eos_id)
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(SENTENCE) == trained.encode(SENTENCE)


def test_eos_named_in_tokenizer_config_wins_over_the_default(tmp_path):
    trained = train_tokenizer(TEXTS, vocab_size=300)
    trained.backend.add_special_tokens(["</s>"])
    trained.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": "</s>", "special": True}  # AddedToken form, as transformers writes it
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token == "</s>" and tok.eos_id == trained.backend.token_to_id("</s>")


def test_corrupt_tokenizer_json_names_the_path(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": ')
    with pytest.raises(TokenizerError, match=re.escape(f"cannot read tokenizer file {bad}")) as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_tokenizer_path_names_the_path(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=re.escape(f"tokenizer path does not exist: {tmp_path / 'nope'}")):
        load_tokenizer(tmp_path / "nope")


def test_directory_without_tokenizer_files_is_rejected(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="has neither tokenizer.json nor vocab.json"):
        load_tokenizer(tmp_path)


def test_corrupt_merges_file_names_the_files(tmp_path):
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c d\n")
    with pytest.raises(TokenizerError, match="cannot read tokenizer files .*merges.txt"):
        load_tokenizer(tmp_path)


def test_vocabulary_without_an_end_of_text_token_is_rejected(tmp_path):
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1, "ab": 2}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(TokenizerError, match="no end-of-text token found"):
        load_tokenizer(tmp_path)


def test_training_needs_room_for_all_bytes():
    with pytest.raises(TokenizerError, match="vocab_size=100 must be >= 257"):
        train_tokenizer(TEXTS, vocab_size=100)


def test_training_on_no_text_is_rejected():
    with pytest.raises(TokenizerError, match="training texts are empty"):
        train_tokenizer([], vocab_size=300)
