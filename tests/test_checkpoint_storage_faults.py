"""Storage faults while saving (disk full, permission denied; injected where orbax writes): the previous checkpoint
stays intact, and the run either stops with one line (checkpoint.on_error=stop) or logs one error line and trains
on (continue)."""

import errno
import logging
from pathlib import Path

import pytest
from orbax.checkpoint._src.path import async_path

from launch import train as train_cli
from test_train_fixtures import write_corpus
from ultrathink_jax.train import checkpoint_steps

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    directory = tmp_path_factory.mktemp("faults")
    train, evaluation = write_corpus(directory)
    f = directory / "tiny_config.py"
    f.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom test_train_fixtures import tiny_config\n\n"
                 f"def get_config():\n    return tiny_config({str(train)!r}, {str(evaluation)!r})\n")
    return f


def fail_writes_of_step(monkeypatch, step: int, function: str, error: OSError):
    """Orbax's async `function` (mkdir / write_text) raises `error` for paths inside step `step`'s temporary
    directory, as a full disk or a read-only directory would."""
    real = getattr(async_path, function)

    async def failing(path, *args, **kwargs):
        if f"/{step}.orbax-checkpoint-tmp" in str(path):
            raise error
        return await real(path, *args, **kwargs)

    monkeypatch.setattr(async_path, function, failing)


def test_disk_full_stops_the_run_with_one_line_and_keeps_the_previous_checkpoint(config_file, tmp_path,
                                                                                 monkeypatch, capsys):
    fail_writes_of_step(monkeypatch, 8, "write_text", OSError(errno.ENOSPC, "No space left on device"))
    workdir = tmp_path / "run"
    assert train_cli.main([f"--config={config_file}", f"--workdir={workdir}"]) == 2
    console = capsys.readouterr().err.strip().splitlines()  # run messages (data, eval), then the error
    err = [line for line in console if "error" in line]
    assert len(err) == 1 and console[-1] == err[0], console
    assert err[0].startswith("launch.train: error: saving checkpoint step 8 in "), err
    assert "[Errno 28] No space left on device; step 4 is intact" in err[0], err
    assert checkpoint_steps(workdir) == [4]
    monkeypatch.undo()  # the disk has room again: the rerun resumes from step 4 and finishes
    assert train_cli.main([f"--config={config_file}", f"--workdir={workdir}", "--config.log.progress=true"]) == 0
    assert checkpoint_steps(workdir) == [4, 8, 12] and "resumed from checkpoint step 4" in capsys.readouterr().err


def test_permission_denied_with_on_error_continue_logs_one_line_and_trains_on(config_file, tmp_path,
                                                                             monkeypatch, capsys, caplog):
    fail_writes_of_step(monkeypatch, 4, "mkdir", PermissionError(errno.EACCES, "Permission denied"))
    workdir = tmp_path / "run"
    argv = [f"--config={config_file}", f"--workdir={workdir}", "--config.checkpoint.on_error=continue"]
    with caplog.at_level(logging.WARNING):
        assert train_cli.main(argv) == 0
    assert "error" not in capsys.readouterr().err  # the console has the run's messages, not the failure
    err = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]  # absl's (orbax's) too
    assert len(err) == 1 and "saving checkpoint step 4 in " in err[0] and "Permission denied" in err[0], err
    assert err[0].endswith("no earlier checkpoint; training continues (checkpoint.on_error=continue)"), err
    assert checkpoint_steps(workdir) == [8, 12]
