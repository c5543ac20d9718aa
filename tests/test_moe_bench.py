"""The MoE benchmark's decode table runs on a tiny layer (no timing is asserted) and names the path the rule picks."""

from ultrathink_jax.bench import moe as bench_moe
from ultrathink_jax.config import ModelConfig

TINY = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=24, max_seq_len=32,
                   n_experts=4, n_experts_per_tok=2, moe_d_ff=12)


def test_decode_rows_time_both_paths_and_name_the_chosen_one(monkeypatch):
    monkeypatch.setattr(bench_moe, "DECODE_BATCHES", (1, 8))
    monkeypatch.setattr(bench_moe, "DECODE_STEPS", 2)
    rows = bench_moe._decode_rows(TINY, repeats=1)
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[:3] for c in cells] == [["1", "2", "gather"], ["8", "16", "tiled"]]  # 2E = 8 assignments
    assert all(float(c[3]) > 0 and float(c[4]) > 0 for c in cells)
