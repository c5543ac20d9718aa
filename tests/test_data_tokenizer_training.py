"""A tokenizer trained by build_tokenizer reads at most `tokenizer_train_chars` of the training text, so a streamed
dataset (which has no end) can still get one."""

import pytest

from ultrathink_jax.data import DataError, build_tokenizer, default_config


def config_over(tmp_path, cap: int):
    plain = "the cat sat on the mat. " * 200
    (tmp_path / "a.txt").write_text(plain)
    (tmp_path / "b.txt").write_text("zebra " * 2000)  # only the second file teaches "zebra"
    cfg = default_config()
    cfg.train_files = f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}"
    cfg.vocab_size = 300
    cfg.tokenizer_train_chars = cap
    return cfg, len(plain)


def test_tokenizer_training_stops_after_the_character_cap(tmp_path):
    cfg, first_file_chars = config_over(tmp_path, cap=0)
    everything = build_tokenizer(cfg)
    cfg.tokenizer_train_chars = first_file_chars
    capped = build_tokenizer(cfg)
    assert len(everything.encode(" zebra")) == 1, "with no cap the second file's word is learned"
    assert len(capped.encode(" zebra")) > 2, "the cap stops before the second file"


def test_negative_tokenizer_train_chars_is_rejected(tmp_path):
    cfg, _ = config_over(tmp_path, cap=-1)
    with pytest.raises(DataError, match="tokenizer_train_chars=-1 must be >= 0"):
        build_tokenizer(cfg)
