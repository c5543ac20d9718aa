"""launch.export_gguf / hf.gguf_export without llama.cpp: what the file holds (read back with gguf's own reader) and
the one-line refusals. That llama.cpp runs the files exactly is parity_tests/test_gguf_llamacpp.py."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from launch import export_gguf as cli
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.hf import export_params

BASE = dict(vocab_size=320, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=64, d_ff=64, init_std=0.1, n_layers=2,
            rope_theta=500.0, norm_eps=1e-5)


@pytest.fixture(scope="module")
def tokenizer():
    from ultrathink_jax.data import train_tokenizer

    return train_tokenizer([(Path(sysconfig.get_paths()["stdlib"]) / "shlex.py").read_text()], vocab_size=300)


def random_params(cfg):
    import jax
    from flax import linen as nn

    from ultrathink_jax.params import abstract_params

    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32),
                        nn.unbox(abstract_params(cfg)))


def hf_dir(tmp_path, tokenizer, **overrides):
    cfg = ModelConfig(**{**BASE, **overrides})
    params = random_params(cfg)
    return cfg, params, export_params(params, cfg, tmp_path / "hf", tokenizer=tokenizer)


def test_mixtral_hf_dir_exports_stacked_experts_permuted_rope_and_the_tokenizer(tmp_path, tokenizer, capsys):
    import gguf

    cfg, params, d = hf_dir(tmp_path, tokenizer, n_experts=4, n_experts_per_tok=2, moe_d_ff=32)
    out = tmp_path / "m.gguf"
    assert cli.main(["--hf_dir", str(d), "--out", str(out)]) == 0, capsys.readouterr().err
    r = gguf.GGUFReader(out)
    fields = {f.name: f for f in r.fields.values()}

    def scalar(name):
        f = fields[name]
        return f.contents()

    assert scalar("general.architecture") == "llama" and scalar("tokenizer.ggml.pre") == "gpt-2"
    assert scalar("llama.expert_count") == 4 and scalar("llama.expert_used_count") == 2
    assert scalar("llama.rope.freq_base") == 500.0 and scalar("llama.attention.layer_norm_rms_epsilon") == \
        pytest.approx(1e-5)
    tokens = scalar("tokenizer.ggml.tokens")
    assert len(tokens) == 320 and tokens[tokenizer.eos_id] == "<|endoftext|>" and tokens[-1] == "[PAD319]"
    assert scalar("tokenizer.ggml.token_type")[tokenizer.eos_id] == gguf.TokenType.CONTROL
    tensors = {t.name: t for t in r.tensors}
    block = params["moe_units"]["block_0"]
    # experts stacked [E, F, D] (gguf reports ne reversed); layer 1, expert 2 of w2 = wo[1, 2].T
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.ffn_down_exps.weight"].data)[2],
                                  np.asarray(block["moe"]["wo"])[1, 2].T)
    # q rows are in llama.cpp's interleaved order: row pairs (2i, 2i+1) of a head = HF rows (i, i + hd/2)
    q_hf = np.asarray(block["self_attn"]["q_proj"]["kernel"])[0].reshape(32, -1).T  # [N*hd, D]
    q = np.asarray(tensors["blk.0.attn_q.weight"].data)
    hd = 8
    np.testing.assert_array_equal(q[1], q_hf[hd // 2])
    np.testing.assert_array_equal(q[2], q_hf[1])
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_q8_0_quantizes_matrices_and_keeps_norms_f32(tmp_path, tokenizer):
    import gguf

    from ultrathink_jax.hf.gguf_export import export_gguf

    cfg = ModelConfig(**BASE)
    f = export_gguf(random_params(cfg), cfg, tokenizer, tmp_path / "q.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(f).tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_a_layout_llamacpp_cannot_run_is_refused_in_one_line(tmp_path, tokenizer, capsys):
    _, _, d = hf_dir(tmp_path, tokenizer, n_layers=3, n_experts=4, moe_first_dense=1)
    out = tmp_path / "x.gguf"
    assert cli.main(["--hf_dir", str(d), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("launch.export_gguf: error: ") and "\n" not in err
    assert "moe_first_dense=1 (set moe_first_dense=0)" in err
    assert not out.exists()


def test_bad_arguments_are_one_line_errors(tmp_path, tokenizer, capsys):
    _, _, d = hf_dir(tmp_path, tokenizer)
    out = tmp_path / "y.gguf"
    assert cli.main(["--hf_dir", str(d), "--out", str(out), "--dtype", "q4"]) == 2
    assert "unknown GGUF dtype 'q4'" in capsys.readouterr().err
    out.write_bytes(b"keep me")
    assert cli.main(["--hf_dir", str(d), "--out", str(out)]) == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert cli.main(["--hf_dir", str(tmp_path / "missing"), "--out", str(tmp_path / "z.gguf")]) == 2
    assert capsys.readouterr().err.startswith("launch.export_gguf: error: ")


def test_aux_loss_free_bias_is_refused_by_both_exports(tmp_path, tokenizer):
    from ultrathink_jax.hf import ExportError
    from ultrathink_jax.hf.gguf_export import GGUFLayoutError, export_gguf

    cfg = ModelConfig(**BASE, n_experts=4, router_bias_update_rate=0.01)
    params = random_params(cfg)
    with pytest.raises(ExportError, match="aux-loss-free selection bias"):
        export_params(params, cfg, tmp_path / "hf")
    with pytest.raises(GGUFLayoutError, match="aux-loss-free routing bias"):
        export_gguf(params, cfg, tokenizer, tmp_path / "b.gguf")
