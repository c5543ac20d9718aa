"""The lm-eval hand-off: a run trained for a few steps is exported with launch.export_hf, loads offline with
transformers, and the real `lm_eval` CLI (hf backend, CPU) scores it on the local tasks in examples/lm_eval_tasks.
Its per-choice log-likelihoods and per-document rolling log-likelihoods must equal our JAX model's own sums on
the same tokens: what only our export (weights, config, tokenizer) decides, not lm-eval's own arithmetic."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import required_module
from launch import export_hf
from test_train_fixtures import tiny_config, write_corpus
from ultrathink_jax.train import load_run

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
def our_run(handoff):
    return load_run(handoff[0])


def _token_logprobs(run, sequences: list[list[int]]) -> list[np.ndarray]:
    """Per sequence, log p(token i + 1 | tokens 0..i) under our JAX model restored from the run (one forward)."""
    import jax
    import jax.numpy as jnp

    from ultrathink_jax import sharding
    from ultrathink_jax.model import Transformer

    model, params = run.model_config, run.params
    longest = max(map(len, sequences))
    assert longest <= MAX_SEQ_LEN, f"a sequence has {longest} tokens; it must fit {MAX_SEQ_LEN}"
    tokens = np.zeros((len(sequences), longest), np.int32)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)] = seq
    segments = (np.arange(longest) < np.array([len(s) for s in sequences])[:, None]).astype(np.int32)
    positions = np.broadcast_to(np.arange(longest, dtype=np.int32), tokens.shape)
    apply = jax.jit(lambda p, t, pos, seg: jax.nn.log_softmax(Transformer(model).apply({"params": p}, t, pos, seg)[0]))
    with sharding.activate(sharding.make_mesh({"fsdp": -1})):
        logp = np.asarray(apply(params, jnp.asarray(tokens[:, :-1]), jnp.asarray(positions[:, :-1]),
                                jnp.asarray(segments[:, :-1])), np.float64)
    return [logp[row, np.arange(len(seq) - 1), seq[1:]] for row, seq in enumerate(sequences)]


@pytest.fixture(scope="module")
def our_loglikelihoods(handoff, our_run):
    """{document text: sum of log p(token | BOS + preceding tokens)} from our JAX model restored from the run."""
    samples, tokenizer = handoff[3], our_run.tokenizer
    texts = [s["target"] for s in samples["ultrathink_prose"]]
    logprobs = _token_logprobs(our_run, [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts])
    return {text: float(lp.sum()) for text, lp in zip(texts, logprobs)}


@pytest.fixture(scope="module")
def our_choice_loglikelihoods(handoff, our_run):
    """[(doc_id, choice index, lm-eval's log-likelihood, ours)] for every multiple-choice request lm-eval logged.
    Ours: log p(continuation tokens | context tokens) with lm-eval's split of the text (the context's trailing
    spaces move to the continuation; the continuation is what tokenizing context + continuation adds)."""
    samples, tokenizer = handoff[3], our_run.tokenizer
    requests, sequences = [], []
    for sample in samples["ultrathink_completion"]:
        # the samples file holds request i's (context, continuation) as {"gen_args_i": {"arg_0": .., "arg_1": ..}}
        arguments = [sample["arguments"][f"gen_args_{i}"] for i in range(len(sample["resps"]))]
        for index, (args, response) in enumerate(zip(arguments, sample["resps"])):
            context, continuation = args["arg_0"], args["arg_1"]
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole, n_context = tokenizer.encode(context + continuation), len(tokenizer.encode(context))
            assert 0 < n_context < len(whole), f"doc {sample['doc_id']} choice {index}: nothing to score"
            requests.append((sample["doc_id"], index, float(response[0][0]), n_context))
            sequences.append(whole)
    logprobs = _token_logprobs(our_run, sequences)
    return [(doc, index, theirs, float(lp[n_context - 1:].sum()))
            for (doc, index, theirs, n_context), lp in zip(requests, logprobs)]


def test_lm_eval_scores_every_multiple_choice_item(handoff):
    _, _, results, samples = handoff
    n_items = len(_local_data().completion_items()["test"])
    assert results["n-samples"]["ultrathink_completion"]["effective"] == n_items == len(samples["ultrathink_completion"])


def test_lm_eval_choice_loglikelihoods_equal_our_model_per_choice(our_choice_loglikelihoods):
    """What only our export decides: lm-eval, through transformers, gives each choice our model's log-likelihood."""
    worst = max(our_choice_loglikelihoods, key=lambda r: abs(r[2] - r[3]) / abs(r[3]))
    doc, index, theirs, ours = worst
    assert abs(theirs - ours) / abs(ours) < 1e-4, \
        f"lm-eval vs JAX choice log-likelihood, worst: doc {doc} choice {index}: {theirs:.5f} vs {ours:.5f}"


def test_lm_eval_rolling_loglikelihood_equals_our_model_per_document(handoff, our_loglikelihoods):
    _, _, _, samples = handoff
    theirs = {s["target"]: float(s["resps"][0][0]) for s in samples["ultrathink_prose"]}
    assert theirs.keys() == our_loglikelihoods.keys()
    worst = max(abs(theirs[t] - our_loglikelihoods[t]) / abs(our_loglikelihoods[t]) for t in theirs)
    assert worst < 1e-4, "lm-eval vs JAX per-document log-likelihood: " + ", ".join(
        f"{theirs[t]:.3f}/{our_loglikelihoods[t]:.3f}" for t in theirs)


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
