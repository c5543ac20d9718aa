"""Exports load exactly in transformers 4.x too, not only in the 5.x this venv tests against.

The exported directories are loaded by `parity_tests/hf4_check.py` under a separate python whose transformers is
4.x (`.venv-hf4/bin/python` at the repo root, or $ULTRATHINK_HF4_PYTHON); every 4.x test fails when there is
none (`make test` builds it). Checked: loading with no missing / unexpected tensors as the expected class, logits
vs JAX and vs transformers 5.x, greedy generation vs JAX, tokenizer ids vs ours and 5.x, a sharded bfloat16 export,
a windowed dense (qwen2_moe) export, and the one layout 4.x refuses (qwen2_moe with an explicit head_dim), which
export warns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
import warnings
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import linen as nn

from conftest import extra_python
from parity_tests import jax_models as jm
from parity_tests.tolerances import assert_logits_close
from ultrathink_jax.hf import HFCompatibilityWarning, export_params, family
from ultrathink_jax.params import abstract_params

REPO = Path(__file__).resolve().parents[1]
CHECK_SCRIPT = REPO / "parity_tests" / "hf4_check.py"
NEW_TOKENS = 32
SAMPLE_TEXT = "def split(s, comments=False):\n    return <|endoftext|> h\u00e9llo  w\u00f6rld\t\n"


def random_params(cfg, seed: int = 3):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (1.0 + 0.2 * rng.standard_normal(x.shape) if path[-1].key == "scale"
                         else cfg.init_std * rng.standard_normal(x.shape)).astype(np.float32),
        nn.unbox(abstract_params(cfg)))


def tokens() -> np.ndarray:
    """The forward batch: real text and random ids (the rows of jm.batches())."""
    return np.concatenate([t for _, t in jm.batches()])


def jax_logits(cfg, params) -> np.ndarray:
    return np.concatenate([jm.forward(cfg, params, t)[0] for _, t in jm.batches()])


def tokenizer():
    from ultrathink_jax.data import train_tokenizer

    text = (Path(sysconfig.get_paths()["stdlib"]) / "shlex.py").read_text()
    return train_tokenizer([text], vocab_size=300)


def _bf16(params):
    return jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), params)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """name -> (config, float32 params the export holds, export dir, request for hf4_check)."""
    out = {}
    for name in jm.MODELS:  # the trained parity models: llama, mixtral, qwen2_moe
        prompt = jm.text_batch(1, 16, seed=11)[0].tolist()
        out[name] = (jm.config(name), jm.params(name, "trained"), jm.export_dir(name, "trained"),
                     {"generate": {"prompt": prompt, "new_tokens": NEW_TOKENS}})
    windowed = jm.config("dense", sliding_window=6, head_dim=0)  # dense + window exports as qwen2_moe
    p = random_params(windowed)
    out["dense_window"] = (windowed, p, export_params(p, windowed, tmp_path_factory.mktemp("window")), {})
    # several shards + bfloat16: what 4.x reads is the index and the upcast bf16 tensors
    cfg, p = jm.config("mixtral"), jm.params("mixtral", "trained")
    d = export_params(p, cfg, tmp_path_factory.mktemp("sharded"), dtype="bfloat16", max_shard_bytes=40_000)
    out["mixtral_sharded_bf16"] = (cfg, _bf16(p), d, {})
    tok = tokenizer()
    cfg = jm.config("dense", vocab_size=tok.vocab_size)
    p = random_params(cfg)
    d = export_params(p, cfg, tmp_path_factory.mktemp("tokenizer"), tokenizer=tok)
    out["with_tokenizer"] = (cfg, p, d, {"text": SAMPLE_TEXT})
    cfg = jm.config("qwen2_moe", head_dim=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HFCompatibilityWarning)
        d = export_params(random_params(cfg), cfg, tmp_path_factory.mktemp("qwen_head_dim"))
    out["qwen2_moe_head_dim"] = (cfg, None, d, {})
    return out


@pytest.fixture(scope="module")
def hf4_python():
    return extra_python(".venv-hf4", "ULTRATHINK_HF4_PYTHON")  # fails, naming how to build it, when absent


@pytest.fixture(scope="module")
def hf4(hf4_python, cases, tmp_path_factory):
    """(summary.json contents, output dir) of one hf4_check.py run over every case."""
    work = tmp_path_factory.mktemp("hf4")
    request = {"models": {name: {"dir": str(d), "input_ids": (tokens() % cfg.vocab_size).tolist(), **extra}
                          for name, (cfg, _, d, extra) in cases.items()}}
    (work / "request.json").write_text(json.dumps(request))
    run = subprocess.run([str(hf4_python), str(CHECK_SCRIPT), str(work / "request.json"), str(work / "out")],
                         capture_output=True, text=True, timeout=600, cwd=work,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    summary_file = work / "out" / "summary.json"
    assert run.returncode in (0, 1) and summary_file.is_file(), \
        f"hf4_check.py exited {run.returncode}:\n{run.stderr[-3000:]}"
    return json.loads(summary_file.read_text()), work / "out"


def result(hf4, name: str) -> tuple[dict, dict]:
    summary, out = hf4
    record = summary["models"][name]
    assert "error" not in record, f"transformers {summary['transformers']} failed on {name}: {record['error']}"
    return record, dict(np.load(out / f"{name}.npz"))


LOADED = ["dense", "mixtral", "qwen2_moe", "dense_window", "mixtral_sharded_bf16", "with_tokenizer"]


def test_the_hf4_python_really_runs_transformers_4(hf4, hf4_python):
    assert hf4[0]["transformers"].startswith("4."), f"{hf4_python} runs transformers {hf4[0]['transformers']}"


@pytest.mark.parametrize("name", LOADED)
def test_export_loads_in_transformers4_as_its_family_with_every_tensor_used(name, cases, hf4):
    record, _ = result(hf4, name)
    expected = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                "qwen2_moe": "Qwen2MoeForCausalLM"}[family(cases[name][0])]
    assert record["class"] == expected, f"{name} loaded as {record['class']}, expected {expected}"
    assert not any(record["loading"].values()), f"{name}: transformers 4.x loading report {record['loading']}"


@pytest.mark.parametrize("name", list(jm.MODELS) + ["mixtral_sharded_bf16"])
def test_transformers4_logits_match_jax(name, cases, hf4):
    cfg, params, _, _ = cases[name]
    _, arrays = result(hf4, name)
    assert_logits_close(torch.from_numpy(arrays["logits"]), torch.from_numpy(jax_logits(cfg, params)),
                        f"{name}: transformers 4.x vs JAX logits")


@pytest.mark.parametrize("name", LOADED)
def test_transformers4_logits_match_transformers5(name, cases, hf4):
    """(JAX vs 5.x on these layouts is tested in test_jax_forward.py and tests/test_hf_export.py.)"""
    import transformers

    cfg, _, d, _ = cases[name]
    _, arrays = result(hf4, name)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(jm.torch_ids(tokens() % cfg.vocab_size)).logits
    assert_logits_close(torch.from_numpy(arrays["logits"]), ref, f"{name}: transformers 4.x vs 5.x logits")


@pytest.mark.parametrize("name", list(jm.MODELS))
def test_transformers4_greedy_generation_matches_jax(name, cases, hf4):
    from ultrathink_jax.generate import generate

    cfg, params, _, extra = cases[name]
    _, arrays = result(hf4, name)
    ours = generate(params, cfg, [extra["generate"]["prompt"]], NEW_TOKENS, mesh=jm.one_device_mesh())[0]
    theirs = arrays["generated"].tolist()
    assert theirs == ours, f"{name}: transformers 4.x greedy {theirs} vs JAX {ours}"


def test_transformers4_tokenizer_encodes_and_decodes_like_ours_and_transformers5(cases, hf4):
    import transformers

    record, arrays = result(hf4, "with_tokenizer")
    _, _, d, _ = cases["with_tokenizer"]
    tok = tokenizer()
    hf5 = transformers.AutoTokenizer.from_pretrained(d, local_files_only=True)
    ids4 = arrays["text_ids"].tolist()
    assert ids4 == tok.encode(SAMPLE_TEXT), f"4.x ids {ids4} vs ours {tok.encode(SAMPLE_TEXT)}"
    assert ids4 == hf5(SAMPLE_TEXT)["input_ids"], f"4.x ids {ids4} vs 5.x {hf5(SAMPLE_TEXT)['input_ids']}"
    special = record["tokenizer"]
    assert (special["eos_token_id"], special["bos_token_id"], special["pad_token_id"]) == \
        (tok.eos_id, tok.bos_id, tok.pad_id), f"4.x special ids {special} vs ours {(tok.eos_id, tok.bos_id, tok.pad_id)}"
    assert special["decoded"] == SAMPLE_TEXT, f"4.x decodes to {special['decoded']!r}"


def test_transformers4_refuses_qwen2_moe_with_explicit_head_dim(hf4):
    """Keeps the export warning honest: if 4.x ever loads this layout, the warning must go."""
    error = hf4[0]["models"]["qwen2_moe_head_dim"].get("error", "")
    assert "hidden_size must be divisible by num_heads" in error, f"4.x result: {error or 'loaded'}"


def test_qwen2_moe_export_with_explicit_head_dim_warns_that_transformers4_refuses_it(tmp_path):
    cfg = jm.config("qwen2_moe", head_dim=12)
    with pytest.warns(HFCompatibilityWarning, match=r"head_dim=12 != d_model/n_heads=8.*transformers 4.x refuses"):
        export_params(random_params(cfg), cfg, tmp_path)


@pytest.mark.parametrize("name,overrides", [("dense", {"head_dim": 12}), ("mixtral", {"head_dim": 12}),
                                            ("qwen2_moe", {})])
def test_exports_that_transformers4_loads_do_not_warn(name, overrides, tmp_path):
    """llama and mixtral honour an explicit head_dim in 4.x; qwen2_moe with head_dim = d_model / n_heads loads."""
    cfg = jm.config(name, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HFCompatibilityWarning)
        export_params(random_params(cfg), cfg, tmp_path)
