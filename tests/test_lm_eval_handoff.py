"""The lm-eval hand-off: a run trained for a few steps is exported with launch.export_hf, loads offline with
transformers, and the real `lm_eval` CLI (hf backend, CPU) scores it on the local tasks in examples/lm_eval_tasks.
Its per-document rolling log-likelihoods must equal our JAX model's own sums on the same tokens, and its
perplexities must follow from those sums."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import required_module
from launch import export_hf
from test_train_fixtures import tiny_config, write_corpus

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "examples" / "lm_eval_tasks"
MAX_SEQ_LEN = 512  # every prose document fits one lm-eval window, so its score is one plain forward pass
STEPS = 4


def _local_data():
    spec = importlib.util.spec_from_file_location("lm_eval_local_data", TASKS_DIR / "local_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def handoff(tmp_path_factory):
    """(workdir, hf_dir, results json, {task: samples}) after train -> export -> lm_eval."""
    required_module("accelerate")  # lm-eval's hf model imports it (lm-eval[hf])
    required_module("lm_eval")
    from ultrathink_jax.train import train

    root = tmp_path_factory.mktemp("lm_eval")
    train_file, _ = write_corpus(root / "corpus")
    config = tiny_config(train_file, None, **{"model.max_seq_len": MAX_SEQ_LEN, "train.steps": STEPS,
                                              "checkpoint.every_steps": STEPS, "log.every_steps": STEPS})
    workdir, hf_dir, out = root / "run", root / "hf", root / "lm_eval_out"
    train(config, workdir)
    assert export_hf.main([f"--workdir={workdir}", f"--out={hf_dir}"]) == 0

    # Run from an unrelated directory: the task data must not depend on the working directory.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(root / "hf_home"), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32",
           "--tasks", "ultrathink_completion,ultrathink_prose", "--include_path", str(TASKS_DIR),
           "--device", "cpu", "--batch_size", "4", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"lm_eval exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    results_files = sorted(out.rglob("results_*.json"))
    assert len(results_files) == 1, f"expected one results file under {out}, found {results_files}"
    results = json.loads(results_files[0].read_text())
    samples = {}
    for task in ("ultrathink_completion", "ultrathink_prose"):
        (file,) = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = sorted((json.loads(line) for line in file.read_text().splitlines()),
                               key=lambda s: s["doc_id"])
    return workdir, hf_dir, results, samples


@pytest.fixture(scope="module")
def our_loglikelihoods(handoff):
    """{document text: sum of log p(token | BOS + preceding tokens)} from our JAX model restored from the run."""
    import jax
    import jax.numpy as jnp

    from ultrathink_jax import sharding
    from ultrathink_jax.losses import cross_entropy
    from ultrathink_jax.model import Transformer
    from ultrathink_jax.train import load_run

    workdir, _, _, samples = handoff
    model, params, tokenizer, _ = load_run(workdir)
    texts = [s["target"] for s in samples["ultrathink_prose"]]
    ids = [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts]
    longest = max(map(len, ids))
    assert longest <= MAX_SEQ_LEN, f"a document has {longest} tokens with BOS; it must fit {MAX_SEQ_LEN}"
    tokens = np.zeros((len(ids), longest), np.int32)
    for row, doc in enumerate(ids):
        tokens[row, :len(doc)] = doc
    segments = (np.arange(longest) < np.array([len(d) for d in ids])[:, None]).astype(np.int32)
    positions = np.broadcast_to(np.arange(longest, dtype=np.int32), tokens.shape)
    apply = jax.jit(lambda p, t, pos, seg: Transformer(model).apply({"params": p}, t, pos, seg)[0])
    with sharding.activate(sharding.make_mesh({"fsdp": -1})):
        logits = apply(params, jnp.asarray(tokens[:, :-1]), jnp.asarray(positions[:, :-1]),
                       jnp.asarray(segments[:, :-1]))
    weights = jnp.asarray(segments[:, 1:], jnp.float32)  # every real token after BOS is a target
    out = {}
    for row, text in enumerate(texts):
        nll, count = cross_entropy(logits[row:row + 1], jnp.asarray(tokens[row:row + 1, 1:]), weights[row:row + 1])
        assert int(count) == len(ids[row]) - 1
        out[text] = -float(nll)
    return out


def test_lm_eval_scores_every_multiple_choice_item_with_accuracies_in_unit_interval(handoff):
    _, _, results, samples = handoff
    metrics = results["results"]["ultrathink_completion"]
    n_items = len(_local_data().completion_items()["test"])
    assert results["n-samples"]["ultrathink_completion"]["effective"] == n_items == len(samples["ultrathink_completion"])
    for name in ("acc,none", "acc_norm,none"):
        assert 0.0 <= metrics[name] <= 1.0, f"{name} = {metrics[name]}"
    # acc is the share of items whose gold choice has the highest log-likelihood among lm-eval's own scores.
    correct = [int(np.argmax([float(r[0][0]) for r in s["resps"]]) == int(s["target"]))
               for s in samples["ultrathink_completion"]]
    assert metrics["acc,none"] == pytest.approx(np.mean(correct)), f"acc {metrics['acc,none']} vs {np.mean(correct)}"


def test_lm_eval_rolling_loglikelihood_equals_our_model_per_document(handoff, our_loglikelihoods):
    _, _, _, samples = handoff
    theirs = {s["target"]: float(s["resps"][0][0]) for s in samples["ultrathink_prose"]}
    assert theirs.keys() == our_loglikelihoods.keys()
    worst = max(abs(theirs[t] - our_loglikelihoods[t]) / abs(our_loglikelihoods[t]) for t in theirs)
    assert worst < 1e-4, "lm-eval vs JAX per-document log-likelihood: " + ", ".join(
        f"{theirs[t]:.3f}/{our_loglikelihoods[t]:.3f}" for t in theirs)


def test_lm_eval_perplexities_follow_from_our_log_likelihoods(handoff, our_loglikelihoods):
    _, _, results, _ = handoff
    metrics = results["results"]["ultrathink_prose"]
    total = sum(our_loglikelihoods.values())
    words = sum(len(re.split(r"\s+", t)) for t in our_loglikelihoods)
    n_bytes = sum(len(t.encode("utf-8")) for t in our_loglikelihoods)
    expected = {"word_perplexity,none": math.exp(-total / words), "byte_perplexity,none": math.exp(-total / n_bytes),
                "bits_per_byte,none": -total / n_bytes / math.log(2)}
    for name, value in expected.items():
        assert math.isfinite(metrics[name]) and metrics[name] == pytest.approx(value, rel=1e-3), \
            f"{name}: lm-eval {metrics[name]} vs ours {value}"


def test_lm_eval_uses_the_exported_context_length_and_tokenizer_specials(handoff):
    _, _, results, _ = handoff
    assert results["max_length"] == MAX_SEQ_LEN, f"lm-eval max_length {results['max_length']}"
    assert results["tokenizer_bos_token"] == ["<|endoftext|>", "0"], results["tokenizer_bos_token"]


def test_export_loads_offline_with_transformers_and_tokenizes_like_our_tokenizer(handoff):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ultrathink_jax.data import load_tokenizer
    from ultrathink_jax.data.pipeline import TOKENIZER_DIR

    workdir, hf_dir, _, samples = handoff
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    ours = load_tokenizer(workdir / TOKENIZER_DIR)
    assert type(model).__name__ == "LlamaForCausalLM"
    for sample in samples["ultrathink_prose"]:
        text = sample["target"]
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ours.encode(text), text[:40]


def test_local_task_data_files_hold_meaningful_items():
    data = _local_data()
    items = data.completion_items()["test"]
    docs = data.prose_documents()["test"]
    assert len(items) >= 20 and len(docs) >= 5, f"{len(items)} items, {len(docs)} documents"
    assert all(len(set(c)) == len(c) >= 2 for c in items["choices"]), "choices must be distinct"
    assert all(len(d.split()) >= 20 for d in docs["text"]), "documents must be real paragraphs"


def test_malformed_completion_line_is_reported_with_its_line_number(tmp_path, monkeypatch):
    data = _local_data()
    (tmp_path / "completion.jsonl").write_text(
        '{"context": "a", "choices": ["b", "c"], "answer": 0}\n{"context": "a", "choices": ["b"], "answer": 3}\n')
    monkeypatch.setattr(data, "HERE", tmp_path)
    with pytest.raises(data.LocalTaskDataError, match="line 2: answer 3 is not an index into 1 choices"):
        data.completion_items()


def test_missing_task_data_file_is_named(tmp_path, monkeypatch):
    data = _local_data()
    monkeypatch.setattr(data, "HERE", tmp_path)
    with pytest.raises(data.TaskDataFileNotFoundError, match="task data file does not exist: .*prose.txt"):
        data.prose_documents()
