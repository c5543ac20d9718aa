"""Bad input to launch.train / launch.eval: one line `launch.X: error: ...`, exit status 2, nothing touched."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import eval as eval_cli
from launch import train as train_cli
from test_train_fixtures import make_run_dir, tiny_config, write_corpus

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def config_file(corpus, tmp_path):
    """A config file for the CLI: the tests' tiny config on the corpus."""
    f = tmp_path / "tiny_config.py"
    f.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom test_train_fixtures import tiny_config\n\n"
                 f"def get_config():\n    return tiny_config({str(corpus[0])!r}, {str(corpus[1])!r})\n")
    return f


def fails_with(capsys, main, argv, *fragments) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), f"stderr: {err}"
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def test_missing_training_data_path(capsys, config_file, tmp_path):
    fails_with(capsys, train_cli.main, [f"--config={config_file}", f"--workdir={tmp_path / 'run'}",
                                        f"--config.data.train_files={tmp_path / 'absent' / '*.txt'}"],
               "launch.train: error:", "absent")


def test_empty_training_data_file(capsys, config_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    fails_with(capsys, train_cli.main, [f"--config={config_file}", f"--workdir={tmp_path / 'run'}",
                                        f"--config.data.train_files={empty}"], "empty")


def test_unknown_config_key_names_the_key(capsys, config_file, tmp_path):
    line = fails_with(capsys, train_cli.main, [f"--config={config_file}", "--config.optim.learning_rat=0.1"],
                      "'optim.learning_rat'", "learning_rate")
    assert "known" in line


def test_badly_typed_override_names_the_key(capsys, config_file):
    fails_with(capsys, train_cli.main, [f"--config={config_file}", "--config.train.steps", "many"],
               "train.steps='many'", "int")


def test_unreadable_tokenizer(capsys, config_file, tmp_path):
    garbage = tmp_path / "tokenizer.json"
    garbage.write_bytes(b"\x00not json")
    fails_with(capsys, train_cli.main, [f"--config={config_file}", f"--workdir={tmp_path / 'run'}",
                                        f"--config.data.tokenizer={garbage}"], str(garbage))


def test_workdir_with_other_model_shape_is_refused_and_left_untouched(capsys, corpus, config_file, tmp_path):
    workdir = tmp_path / "run"
    make_run_dir(workdir, tiny_config(*corpus))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in workdir.rglob("*") if p.is_file()}
    fails_with(capsys, train_cli.main, [f"--config={config_file}", f"--workdir={workdir}",
                                        "--config.model.n_layers=3"], "different model shape", "n_layers 2 -> 3")
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in workdir.rglob("*") if p.is_file()}
    assert after == before, f"changed: {sorted(str(p) for p in set(before) ^ set(after))}"


def test_eval_of_a_directory_that_is_not_a_run(capsys, tmp_path):
    fails_with(capsys, eval_cli.main, [f"--workdir={tmp_path}"], "launch.eval: error:", "not a training run")


def test_cli_process_prints_one_line_and_exits_2():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--config.train.nope=1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip()] and proc.stderr.startswith("launch.train: error: unknown config key 'train.nope'"), \
        proc.stderr
