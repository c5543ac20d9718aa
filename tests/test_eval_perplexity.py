"""launch.eval's perplexity equals one computed independently, document by document, row by row."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultrathink_jax.train.perplexity import evaluate_run
from test_train_fixtures import make_run_dir, tiny_config, write_corpus
from ultrathink_jax.data import load_tokenizer
from ultrathink_jax.model import Transformer
from ultrathink_jax.train import load_run

SEQ = 16
DOCS = ["the cat sat on a mat . we read old books in the park .",
        "rain falls on the roof . birds sing in trees . a dog ran to the park . the end ."]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    workdir = tmp_path_factory.mktemp("run")
    make_run_dir(workdir, tiny_config(*corpus, **{"data.seq_len": SEQ}), seed=3)
    return workdir


def independent_nll(model, params, docs: list[list[int]], eos: int, seq_len: int) -> tuple[float, int]:
    """Sum of -log p over the stream's scored pairs. The stream is each document + EOS; row r holds stream
    tokens [r*L, r*L + L], and a document's piece inside a row is scored with a fresh context (position 0)."""
    stream = [t for doc in docs for t in doc + [eos]]
    doc_of = [i for i, doc in enumerate(docs) for _ in doc + [eos]]
    pieces = []
    for start in range(0, len(stream) - 1, seq_len):
        idx = list(range(start, min(start + seq_len + 1, len(stream))))
        for d in sorted(set(doc_of[i] for i in idx)):
            piece = [stream[i] for i in idx if doc_of[i] == d]
            if len(piece) >= 2:
                pieces.append(piece)
    total, count = 0.0, 0
    apply = jax.jit(lambda p, t, pos, seg: Transformer(model).apply({"params": p}, t, pos, seg)[0])
    for piece in pieces:
        tokens = np.zeros((1, seq_len + 1), np.int32)
        tokens[0, :len(piece)] = piece
        segments = (np.arange(seq_len + 1) < len(piece)).astype(np.int32)[None]
        positions = np.arange(seq_len + 1, dtype=np.int32)[None]
        logits = np.asarray(apply(params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)),
                            np.float64)[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        for t in range(len(piece) - 1):
            total -= logp[t, piece[t + 1]]
            count += 1
    return total, count


def test_eval_perplexity_matches_an_independent_row_by_row_computation(run_dir, tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(DOCS) + "\n")
    result = evaluate_run(str(run_dir), str(text))
    model, params, tokenizer, config = load_run(run_dir)
    docs = [tokenizer.encode(d) for d in DOCS]  # paragraph split: the trailing newline is stripped
    total, count = independent_nll(model, params, docs, tokenizer.eos_id, SEQ)
    assert sum(map(len, docs)) + len(docs) - 1 > 2 * SEQ, "text must span rows, with a final partial row"
    assert result["tokens"] == count, f"scored {result['tokens']} targets, expected {count}"
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5), \
        f"launch.eval {result['perplexity']:.6f} vs independent {math.exp(total / count):.6f}"


def test_load_run_restores_the_saved_model_tokenizer_and_config(run_dir):
    model, params, tokenizer, config = load_run(run_dir)
    assert model.vocab_size % 64 == 0 and model.vocab_size >= tokenizer.vocab_size
    assert config.model.vocab_size == model.vocab_size and config.data.seq_len == SEQ
    assert params["embed_tokens"]["embedding"].shape == (model.vocab_size, model.d_model)
    assert load_tokenizer(run_dir / "tokenizer").encode("the cat") == tokenizer.encode("the cat")
