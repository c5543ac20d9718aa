"""Tokenizer: a thin wrapper over a `tokenizers.Tokenizer` that knows its EOS/BOS/PAD ids.

Loads a Hugging Face tokenizer directory or `tokenizer.json`, a GPT-2 style `vocab.json` + `merges.txt`
pair, or a tokenizer shipped in the package (`builtin:gpt2`); or trains a byte-level BPE. `save(dir)` writes
files that `transformers.AutoTokenizer` reloads as a `PreTrainedTokenizerFast` encoding to the same ids
(written by hand: a `GPT2TokenizerFast.save_pretrained` directory reloads under transformers 5.x as a class
that encodes everything to []).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ultrathink_jax import atomic
from ultrathink_jax.data.errors import DataFileNotFoundError, TokenizerError
from ultrathink_jax.errors import one_line

ENDOFTEXT = "<|endoftext|>"
# End-of-document markers of common model families, tried in order when a tokenizer names no eos_token.
_EOS_CANDIDATES = (ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
BUILTIN_PREFIX = "builtin:"
# Tokenizers in ultrathink_jax/assets (package data): named by a config without a path or a download.
BUILTIN = {"gpt2": Path(__file__).resolve().parents[1] / "assets" / "gpt2_tokenizer"}


class Tokenizer:
    """Encodes text to token ids and back. Special tokens are never added implicitly: packing adds EOS itself."""

    def __init__(self, backend: _Backend, eos_token: str, bos_token: str | None = None,
                 pad_token: str | None = None, source: str = "<memory>", chat_template: str | None = None):
        self.backend = backend
        self.source = source
        self.chat_template = chat_template  # Jinja text from tokenizer_config.json (see posttrain.chat), kept on save
        self.eos_token = eos_token
        self.bos_token = bos_token or eos_token  # GPT-2 convention: one <|endoftext|> serves all three roles
        self.pad_token = pad_token or eos_token
        self.eos_id = self._id_of(eos_token, "eos_token")
        self.bos_id = self._id_of(self.bos_token, "bos_token")
        self.pad_id = self._id_of(self.pad_token, "pad_token")

    def _id_of(self, token: str, role: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"tokenizer {self.source}: {role} {token!r} is not in its vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the model must embed (base vocabulary plus added tokens)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking; it runs on all cores in Rust.
        fast = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> str:
        """Stable text identifying the exact tokenization (used as part of token-cache keys)."""
        return self.backend.to_str() + f"|eos={self.eos_id}"

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns the directory."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": False,
            "add_eos_token": False,
            # True would rewrite " ." to "." on decode, so HF decode would differ from ours.
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic.write_text(out / "tokenizer.json", self.backend.to_str(pretty=True))
        atomic.write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        atomic.write_text(out / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
        return out

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads from a directory (tokenizer.json, or vocab.json + merges.txt), a tokenizer.json file, a
    "VOCAB.json,MERGES.txt" pair, or "builtin:NAME" (a shipped tokenizer, see BUILTIN)."""
    text = os.fspath(path)
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX):]
        if name not in BUILTIN:
            raise TokenizerError(f"unknown built-in tokenizer {text!r}; shipped: "
                                 f"{[BUILTIN_PREFIX + n for n in sorted(BUILTIN)]}")
        return _from_tokenizer_json(BUILTIN[name] / "tokenizer.json", BUILTIN[name])
    if "," in text:
        vocab, merges = (Path(p.strip()) for p in text.split(",", 1))
        return _from_vocab_merges(vocab, merges)
    p = Path(text)
    if not p.exists():
        raise DataFileNotFoundError(f"tokenizer path does not exist: {p}")
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return _from_tokenizer_json(p / "tokenizer.json", p)
        if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return _from_vocab_merges(p / "vocab.json", p / "merges.txt")
        raise DataFileNotFoundError(f"tokenizer directory {p} has neither tokenizer.json nor vocab.json + merges.txt")
    return _from_tokenizer_json(p, p.parent)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Trains a GPT-2 style byte-level BPE (every byte is in the alphabet, so no text is ever unknown)."""
    if vocab_size < 257:
        raise TokenizerError(f"tokenizer vocab_size={vocab_size} must be >= 257 (256 bytes + {ENDOFTEXT})")
    backend = _byte_level(_Backend(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = [0]

    def counted():
        for t in texts:
            seen[0] += len(t)
            yield t

    backend.train_from_iterator(counted(), trainer=trainer)
    if seen[0] == 0:
        raise TokenizerError("cannot train a tokenizer: the training texts are empty")
    return Tokenizer(backend, ENDOFTEXT, source=f"trained(vocab_size={vocab_size})")


def _byte_level(backend: _Backend) -> _Backend:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _from_vocab_merges(vocab: Path, merges: Path) -> Tokenizer:
    for f in (vocab, merges):
        if not f.is_file():
            raise DataFileNotFoundError(f"tokenizer file does not exist: {f}")
    try:
        backend = _byte_level(_Backend(models.BPE.from_file(str(vocab), str(merges))))
    except Exception as e:  # tokenizers raises plain Exception on malformed files
        raise TokenizerError(f"cannot read tokenizer files {vocab} + {merges}: {one_line(e)}") from e
    eos = _guess_eos(backend, f"{vocab} + {merges}")
    backend.add_special_tokens([eos])  # already in the vocabulary; this makes it match as one token, as in HF
    return Tokenizer(backend, eos, source=str(vocab.parent))


def _from_tokenizer_json(file: Path, directory: Path) -> Tokenizer:
    try:
        backend = _Backend.from_file(str(file))
    except Exception as e:
        raise TokenizerError(f"cannot read tokenizer file {file}: {one_line(e)}") from e
    special, chat_template = {}, None
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # config wins: read last
        cfg_file = directory / name
        if cfg_file.is_file():
            try:
                values = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"cannot read tokenizer file {cfg_file}: {one_line(e)}") from e
            for role in ("eos_token", "bos_token", "pad_token"):
                token = _token_content(values.get(role))
                if token:
                    special[role] = token
            if isinstance(values.get("chat_template"), str):
                chat_template = values["chat_template"]
    if chat_template is None and (directory / "chat_template.jinja").is_file():  # transformers 5 writes it apart
        chat_template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    eos = special.get("eos_token") or _guess_eos(backend, str(file))
    return Tokenizer(backend, eos, special.get("bos_token"), special.get("pad_token"), source=str(file),
                     chat_template=chat_template)


def _token_content(value) -> str | None:
    # transformers writes special tokens either as plain strings or as AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _guess_eos(backend: _Backend, where: str) -> str:
    for candidate in _EOS_CANDIDATES:
        if backend.token_to_id(candidate) is not None:
            return candidate
    raise TokenizerError(f"tokenizer {where}: no end-of-text token found (tried {list(_EOS_CANDIDATES)}); "
                         "add an eos_token to tokenizer_config.json")
