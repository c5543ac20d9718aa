"""Packing: documents + EOS, greedy rows of seq_len + 1 tokens, segment ids / positions / weights per row."""

import numpy as np
import pytest

from ultrathink_jax.data.errors import DataError
from ultrathink_jax.data.packing import FIELDS, TokenStream, empty_row, num_rows, pack_documents, pack_row

EOS, PAD, VOCAB = 0, 11, 12  # a PAD distinct from EOS keeps the expectations readable
DOCS = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]  # stream: 1 2 3 0 | 4 5 0 | 6 7 8 9 10 0  (13 tokens)


def _stream():
    return pack_documents(DOCS, EOS, VOCAB)


def test_documents_are_concatenated_each_followed_by_eos():
    s = _stream()
    assert s.tokens.tolist() == [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 0]
    assert s.doc_starts.tolist() == [0, 4, 7]


def test_row_inside_one_document_scores_every_target():
    row = pack_row(_stream(), 0, seq_len=4, pad_id=PAD)  # tokens 1 2 3 0 | 4
    assert row["inputs"].tolist() == [1, 2, 3, 0]
    assert row["targets"].tolist() == [2, 3, 0, 4]
    assert row["segment_ids"].tolist() == [1, 1, 1, 1]
    assert row["positions"].tolist() == [0, 1, 2, 3]
    # The EOS -> first token of the next document crosses a boundary: not scored.
    assert row["weights"].tolist() == [1, 1, 1, 0]


def test_row_spanning_documents_restarts_segments_and_positions():
    row = pack_row(_stream(), 1, seq_len=4, pad_id=PAD)  # tokens 4 5 0 6 | 7 (doc 2 continues from row 0)
    assert row["inputs"].tolist() == [4, 5, 0, 6]
    assert row["targets"].tolist() == [5, 0, 6, 7]
    assert row["segment_ids"].tolist() == [1, 1, 1, 2]
    assert row["positions"].tolist() == [0, 1, 2, 0]
    assert row["weights"].tolist() == [1, 1, 0, 1]


def test_document_continued_from_previous_row_starts_at_position_zero():
    row = pack_row(_stream(), 2, seq_len=4, pad_id=PAD)  # tokens 7 8 9 10 | 0, all document 3
    assert row["inputs"].tolist() == [7, 8, 9, 10]
    assert row["positions"].tolist() == [0, 1, 2, 3]
    assert row["segment_ids"].tolist() == [1, 1, 1, 1]
    assert row["weights"].tolist() == [1, 1, 1, 1]


def test_row_fields_are_int32_except_float32_weights_and_have_seq_len():
    row = pack_row(_stream(), 0, seq_len=4, pad_id=PAD)
    assert set(row) == set(FIELDS)
    for name in FIELDS:
        expected = np.float32 if name == "weights" else np.int32
        assert row[name].dtype == expected, f"{name}: {row[name].dtype}"
        assert row[name].shape == (4,), f"{name}: {row[name].shape}"


def test_final_partial_row_is_padded_with_segment_zero_and_weight_zero():
    # seq_len 5: rows [0:6], [5:11], and a partial [10:13] = 9 10 0.
    assert num_rows(13, 5, keep_partial=False) == 2
    assert num_rows(13, 5, keep_partial=True) == 3
    row = pack_row(_stream(), 2, seq_len=5, pad_id=PAD)
    assert row["inputs"].tolist() == [9, 10, EOS, PAD, PAD]
    assert row["targets"].tolist() == [10, EOS, PAD, PAD, PAD]
    assert row["segment_ids"].tolist() == [1, 1, 1, 0, 0]
    assert row["positions"].tolist() == [0, 1, 2, 0, 0]
    assert row["weights"].tolist() == [1, 1, 0, 0, 0]


def test_no_row_exists_when_stream_divides_exactly():
    assert num_rows(13, 4, keep_partial=True) == 3, "12 targets fill exactly 3 rows of 4; no partial row"


def test_rows_cover_the_stream_with_no_padding_and_no_lost_target():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, PAD, size=rng.integers(1, 40)).tolist() for _ in range(50)]
    stream = pack_documents(docs, EOS, 100)
    seq_len = 15
    rows = [pack_row(stream, r, seq_len, PAD) for r in range(num_rows(stream.n_tokens, seq_len, True))]
    assert stream.n_tokens % seq_len != 1, "test data should end in a partial row"
    # PAD never occurs in these documents, so it marks padding exactly.
    targets = np.concatenate([r["targets"][r["targets"] != PAD] for r in rows])
    inputs = np.concatenate([r["inputs"][r["targets"] != PAD] for r in rows])
    assert np.array_equal(targets, stream.tokens[1:]), "every token after the first is a target exactly once"
    assert np.array_equal(inputs, stream.tokens[:-1])
    padded = sum(int((r["targets"] == PAD).sum()) for r in rows)
    assert padded < seq_len, f"only the final row may hold padding, found {padded} padded positions"
    scored = sum(float(r["weights"].sum()) for r in rows)
    assert scored == stream.n_tokens - stream.n_documents, (
        f"scored {scored}: every within-document pair once = {stream.n_tokens - stream.n_documents}")


def test_weights_are_one_exactly_where_target_is_in_the_same_document():
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 50, size=rng.integers(1, 9)).tolist() for _ in range(30)]
    stream = pack_documents(docs, 0, 50)
    doc_of = np.searchsorted(stream.doc_starts, np.arange(stream.n_tokens), side="right")
    seq_len = 8
    for r in range(num_rows(stream.n_tokens, seq_len, keep_partial=True)):
        row = pack_row(stream, r, seq_len, PAD)
        for t in range(seq_len):
            i = r * seq_len + t
            same = i + 1 < stream.n_tokens and doc_of[i] == doc_of[i + 1]
            assert row["weights"][t] == float(same), f"row {r} t {t}: weight {row['weights'][t]}, same doc {same}"


def test_empty_row_is_all_padding():
    row = empty_row(4, pad_id=7)
    assert row["inputs"].tolist() == [7] * 4 and row["weights"].sum() == 0 and row["segment_ids"].sum() == 0


def test_small_vocabulary_is_stored_as_uint16_and_large_as_int32():
    assert pack_documents([[1]], 0, 65536).tokens.dtype == np.uint16
    assert pack_documents([[70000]], 0, 100_000).tokens.dtype == np.int32


def test_out_of_vocabulary_id_is_rejected_with_its_value():
    with pytest.raises(DataError, match=r"token id 12 is outside the vocabulary \[0, 12\)"):
        pack_documents([[1, 12]], EOS, VOCAB)


def test_row_past_the_end_is_rejected():
    with pytest.raises(DataError, match="row 9 is outside a stream of 13 tokens"):
        pack_row(_stream(), 9, 4, PAD)


def test_inconsistent_stream_is_rejected():
    with pytest.raises(DataError, match="doc_starts"):
        TokenStream(np.zeros(4, np.uint16), np.array([1, 2]))
