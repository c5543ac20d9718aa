"""The MoE benchmark's decode table runs on a tiny layer (no timing is asserted) and names the path the rule picks."""

from ultrathink_jax.bench import moe as bench_moe
from ultrathink_jax.config import ModelConfig

TINY = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=24, max_seq_len=32,
                   n_experts=4, n_experts_per_tok=2, moe_d_ff=12)


def test_decode_rows_time_every_path_and_name_the_chosen_one(monkeypatch):
    monkeypatch.setattr(bench_moe, "DECODE_STEPS", 2)
    rows = bench_moe._decode_rows(TINY, repeats=1, batches=(1, 8, 512))
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    # E = 4: gather up to 4 assignments; dense while 4 x tokens <= 1.5 x (assignments + 4 x 64), tiled above
    assert [c[:3] for c in cells] == [["1", "2", "gather"], ["8", "16", "dense"], ["512", "1024", "tiled"]]
    assert all(float(c[i]) > 0 for c in cells for i in (3, 4, 5))
    assert all(c[6] in bench_moe.DECODE_IMPLS and float(c[7].rstrip("x")) >= 1.0 for c in cells)
