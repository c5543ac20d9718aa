"""GGUF exports run in llama.cpp exactly as the JAX model does.

Each case (dense Llama and Mixtral, each with a BPE trained here and with the GPT-2 tokenizer) is written by
`export_gguf` and loaded by `parity_tests/llamacpp_check.py` under the separate `.venv-llama` (llama-cpp-python,
built by `make test`; $ULTRATHINK_LLAMA_PYTHON overrides). There is no skip: without that python the tests fail.
Checked: llama.cpp's token ids of real text equal ours, next-token logits within GGUF_LOGITS_REL x max(1, max|logit|)
of JAX in f32 (q8_0 within GGUF_Q8_0_LOGITS_REL), and the same greedy 32 tokens.
"""

from __future__ import annotations

import json
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_DATA, extra_python
from parity_tests import jax_models as jm
from parity_tests.test_hf4_compat import random_params
from parity_tests.tolerances import GGUF_LOGITS_REL, GGUF_Q8_0_LOGITS_REL
from ultrathink_jax.hf.gguf_export import GGUFLayoutError, export_gguf, gguf_refusal

REPO = Path(__file__).resolve().parents[1]
CHECK_SCRIPT = REPO / "parity_tests" / "llamacpp_check.py"
NEW_TOKENS = 32
EDGE_TEXT = "def split(s, comments=False):\n    return <|endoftext|> h\u00e9llo  w\u00f6rld\t\n  x's 12345 \u4e2d\u6587!\n\n"


def real_text() -> str:
    """Wikitext-2 (a mix of prose, numbers, punctuation and non-ASCII) plus whitespace / special-token edge cases."""
    return (TEST_DATA / "wikitext2_valid_excerpt.txt").read_text(encoding="utf-8") + EDGE_TEXT


def tokenizers():
    from ultrathink_jax.data import load_tokenizer, train_tokenizer

    text = (Path(sysconfig.get_paths()["stdlib"]) / "shlex.py").read_text()
    return {"bpe": train_tokenizer([text], vocab_size=300), "gpt2": load_tokenizer("builtin:gpt2")}


def model_config(name: str, vocab: int):
    # the parity models, with a vocabulary rounded up past the tokenizer's (as training does) and no window
    return jm.config(name, vocab_size=-(-vocab // 64) * 64, sliding_window=0)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """name -> (config, params, tokenizer, file, dtype, request entry)."""
    work = tmp_path_factory.mktemp("gguf")
    toks = tokenizers()
    out = {}
    for model in ("dense", "mixtral"):
        for tok_name, tok in toks.items():
            cfg = model_config(model, tok.vocab_size)
            params = random_params(cfg)
            ids = tok.encode(real_text())[:96]
            for dtype in ("f32", "q8_0") if tok_name == "bpe" else ("f32",):
                name = f"{model}_{tok_name}_{dtype}"
                f = export_gguf(params, cfg, tok, work / f"{name}.gguf", dtype)
                out[name] = (cfg, params, tok, f, dtype,
                             {"file": str(f), "input_ids": ids, "prompt": ids[:12], "new_tokens": NEW_TOKENS,
                              "text": real_text()})
    return out


@pytest.fixture(scope="module")
def llama(cases, tmp_path_factory):
    llama_python = extra_python(".venv-llama", "ULTRATHINK_LLAMA_PYTHON")
    work = tmp_path_factory.mktemp("llamacpp")
    (work / "request.json").write_text(json.dumps({"models": {n: c[5] for n, c in cases.items()}}))
    run = subprocess.run([str(llama_python), str(CHECK_SCRIPT), str(work / "request.json"), str(work / "out")],
                         capture_output=True, text=True, timeout=600, cwd=work)
    summary_file = work / "out" / "summary.json"
    assert run.returncode in (0, 1) and summary_file.is_file(), \
        f"llamacpp_check.py exited {run.returncode}:\n{run.stderr[-3000:]}"
    return json.loads(summary_file.read_text()), work / "out"


def result(llama, name):
    summary, out = llama
    record = summary["models"][name]
    assert "error" not in record, f"llama.cpp {summary['llama_cpp']} failed on {name}: {record['error']}"
    return record, dict(np.load(out / f"{name}.npz"))


F32 = ["dense_bpe_f32", "dense_gpt2_f32", "mixtral_bpe_f32", "mixtral_gpt2_f32"]


@pytest.mark.parametrize("name", F32)
def test_llamacpp_tokenizes_real_text_like_ours(name, cases, llama):
    _, _, tok, _, _, spec = cases[name]
    record, arrays = result(llama, name)
    ours = tok.encode(spec["text"])
    theirs = arrays["text_ids"].tolist()
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    assert theirs == ours, (f"{name}: llama.cpp ids differ from ours at {first}: {theirs[first:first + 8]} vs "
                            f"{ours[first:first + 8]} ({tok.decode(ours[first:first + 8])!r})")
    assert record["pre"] == "gpt-2" and record["detokenized"] == spec["text"]


def _max_rel_diff(cfg, params, arrays, spec):
    ref = jm.forward(cfg, params, np.asarray([spec["input_ids"]], np.int32))[0][0]
    theirs = arrays["logits"]
    assert theirs.shape == ref.shape, f"llama.cpp logits {theirs.shape} vs JAX {ref.shape}"
    return float(np.max(np.abs(theirs - ref)) / max(1.0, float(np.max(np.abs(ref)))))


@pytest.mark.parametrize("name", F32)
def test_llamacpp_f32_logits_match_jax(name, cases, llama):
    cfg, params, _, _, _, spec = cases[name]
    _, arrays = result(llama, name)
    rel = _max_rel_diff(cfg, params, arrays, spec)
    assert rel <= GGUF_LOGITS_REL, f"{name}: llama.cpp vs JAX logits max|d|/max(1,max|logit|) = {rel:.2e}"


@pytest.mark.parametrize("name", ["dense_bpe_q8_0", "mixtral_bpe_q8_0"])
def test_llamacpp_q8_0_logits_within_the_documented_bound(name, cases, llama):
    cfg, params, _, _, _, spec = cases[name]
    _, arrays = result(llama, name)
    rel = _max_rel_diff(cfg, params, arrays, spec)
    bound = GGUF_Q8_0_LOGITS_REL[name.split("_")[0]]
    assert rel <= bound, f"{name}: q8_0 llama.cpp vs JAX f32 logits rel {rel:.2e} > {bound}"
    assert rel > GGUF_LOGITS_REL, f"{name}: q8_0 matches f32 to {rel:.2e}: were the weights really quantized?"


@pytest.mark.parametrize("name", F32)
def test_llamacpp_greedy_32_tokens_match_jax(name, cases, llama):
    from ultrathink_jax.generate import generate

    cfg, params, _, _, _, spec = cases[name]
    _, arrays = result(llama, name)
    ours = generate(params, cfg, [spec["prompt"]], NEW_TOKENS, mesh=jm.one_device_mesh())[0]
    assert arrays["generated"].tolist() == ours, f"{name}: llama.cpp greedy {arrays['generated'].tolist()} vs {ours}"


@pytest.mark.parametrize("overrides, message", [
    (dict(moe_first_dense=1, n_layers=3), r"moe_first_dense=1 \(set moe_first_dense=0\)"),
    (dict(shared_expert_d_ff=16), r"shared_expert_d_ff=16 \(set shared_expert_d_ff=0\)"),
    (dict(sliding_window=6), r"sliding_window=6.*set sliding_window=0"),
])
def test_layouts_llamacpp_cannot_run_are_refused_with_what_to_change(overrides, message, tmp_path):
    cfg = jm.config("mixtral", **{"sliding_window": 0, **overrides})
    assert gguf_refusal(cfg)
    with pytest.raises(GGUFLayoutError, match=message):
        export_gguf(None, cfg, None, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir()), "a refused export must not leave a file"
