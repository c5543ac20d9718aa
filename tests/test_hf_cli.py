"""launch.import_hf / launch.export_hf end to end: HF dir -> run -> HF dir is byte-identical, launch.train resumes
from an imported run, and bad input gives one error line and exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from launch import export_hf, import_hf
from ultrathink_jax.config_files import load_config_file
from test_train_fixtures import tiny_config, write_corpus
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.data import train_tokenizer
from ultrathink_jax.hf import export_params
from ultrathink_jax.params import abstract_params

MODEL = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(hf_dir, workdir, corpus files): a random model + trained tokenizer exported, then imported as a run."""
    import jax
    from flax import linen as nn

    root = tmp_path_factory.mktemp("hf_cli")
    train_file, eval_file = write_corpus(root / "corpus")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32),
                          nn.unbox(abstract_params(MODEL)))
    tokenizer = train_tokenizer([train_file.read_text()], vocab_size=300)
    hf_dir = export_params(params, MODEL, root / "hf", tokenizer=tokenizer)
    config_file = root / "train_config.py"
    config_file.write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom test_train_fixtures import tiny_config\n\n"
        "def get_config():\n    return tiny_config(%r, %r)\n" % (str(_tests_dir()), str(train_file), str(eval_file)))
    workdir = root / "run"
    assert import_hf.main([f"--hf_dir={hf_dir}", f"--workdir={workdir}", f"--config={config_file}"]) == 0
    return hf_dir, workdir, (train_file, eval_file)


def _tests_dir():
    from pathlib import Path

    return Path(__file__).resolve().parent


def test_export_of_an_imported_run_reproduces_every_tensor_bytewise(imported, tmp_path):
    hf_dir, workdir, _ = imported
    assert export_hf.main([f"--workdir={workdir}", f"--out={tmp_path / 'out'}"]) == 0
    original, exported = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert original.keys() == exported.keys()
    differ = [n for n in original if original[n].tobytes() != exported[n].tobytes()]
    assert not differ, f"{len(differ)} tensors changed through import -> export, e.g. {differ[:3]}"
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (hf_dir / "tokenizer.json").read_text()


def test_imported_run_records_the_hf_architecture(imported):
    _, workdir, _ = imported
    saved = json.loads((workdir / "model_config.json").read_text())
    assert ModelConfig(**saved) == MODEL


def test_launch_train_resumes_an_imported_run_from_step_zero(imported):
    from ultrathink_jax.train import checkpoint_steps, train

    _, workdir, _ = imported
    config = load_config_file(str(workdir / "config.py"))
    config.train.steps, config.optim.warmup_steps = 2, 1  # warmup must end before the run does
    result = train(config, workdir)
    assert (result.start_step, result.final_step) == (0, 2), f"run went {result.start_step} -> {result.final_step}"
    assert 0 in checkpoint_steps(workdir) and 2 in checkpoint_steps(workdir)
    assert all(np.isfinite(v) for v in result.losses.values()), result.losses


def _one_error_line(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, f"expected one error line, got {err}"
    for fragment in fragments:
        assert fragment in err[0], f"{fragment!r} not in {err[0]!r}"


def test_export_cli_names_a_missing_workdir(tmp_path, capsys):
    assert export_hf.main([f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'o'}"]) == 2
    _one_error_line(capsys, "launch.export_hf: error:", "not a training run directory")


def test_export_cli_rejects_an_unknown_dtype(imported, tmp_path, capsys):
    assert export_hf.main([f"--workdir={imported[1]}", f"--out={tmp_path / 'o'}", "--dtype=int4"]) == 2
    _one_error_line(capsys, "unknown dtype 'int4'")


def test_export_cli_refuses_a_non_empty_out_dir(imported, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert export_hf.main([f"--workdir={imported[1]}", f"--out={tmp_path}"]) == 2
    _one_error_line(capsys, "is not empty", "--overwrite")


def test_import_cli_refuses_an_unsupported_architecture(imported, tmp_path, capsys):
    hf_dir = tmp_path / "gpt2"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert import_hf.main([f"--hf_dir={hf_dir}", f"--workdir={tmp_path / 'run'}"]) == 2
    _one_error_line(capsys, "launch.import_hf: error:", "unsupported Hugging Face model_type 'gpt2'")


def test_import_cli_refuses_a_workdir_with_checkpoints(imported, capsys):
    hf_dir, workdir, _ = imported
    assert import_hf.main([f"--hf_dir={hf_dir}", f"--workdir={workdir}"]) == 2
    _one_error_line(capsys, "already holds checkpoints")


def test_import_keeps_the_training_configs_router_aux_loss_weight_and_says_so(imported, tmp_path, caplog):
    """An HF config.json's router_aux_loss_coef is the original training's choice; the fine-tuning config's wins."""
    import dataclasses

    import jax
    from flax import linen as nn

    from ultrathink_jax.hf.run import import_run

    _, _, (train_file, eval_file) = imported
    moe = dataclasses.replace(MODEL, n_experts=2, n_experts_per_tok=1, router_aux_loss_weight=0.05)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32),
                          nn.unbox(abstract_params(moe)))
    hf_dir = export_params(params, moe, tmp_path / "hf", tokenizer=train_tokenizer([train_file.read_text()], 300))
    config = tiny_config(train_file, eval_file, **{"model.router_aux_loss_weight": 0.2})
    with caplog.at_level("WARNING", logger="ultrathink_jax.hf.run"):
        import_run(hf_dir, tmp_path / "run", config)
    assert json.loads((tmp_path / "run" / "model_config.json").read_text())["router_aux_loss_weight"] == 0.2
    assert "router_aux_loss_weight=0.2 from the training config is used, not the router_aux_loss_coef=0.05" \
        in caplog.text, caplog.text
