"""Crash harness: `launch.train` processes killed (SIGKILL) mid-step, in the middle of an async checkpoint write and
right after a save, and stopped by SIGTERM (with a second SIGTERM during its checkpoint write), each rerun with
the same command; every rerun resumes from the last complete checkpoint, and the final parameters equal an
uninterrupted run's bitwise. And SIGTERM to one of two processes stops both at one step, saved collectively."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from launch import train as train_cli
from test_train_fixtures import tiny_config, write_corpus
from ultrathink_jax.train import checkpoint_steps, load_run, train
from ultrathink_jax.train.preemption import EXIT_STATUS, StopSignals

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("crash")
    corpus = write_corpus(directory)
    config_file = directory / "tiny_config.py"
    config_file.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom test_train_fixtures import "
                           f"tiny_config\n\ndef get_config():\n    return tiny_config(*{tuple(map(str, corpus))!r})\n")
    return corpus, config_file, directory


def run_cli(args, env, driver=None):
    command = [sys.executable] + ([str(TESTS / "crash_driver.py"), *driver, "--"] if driver else ["-m", "launch.train"])
    return subprocess.run(command + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_killed_and_preempted_runs_resume_to_bitwise_the_uninterrupted_parameters(setup, tmp_path, capsys):
    corpus, config_file, directory = setup
    workdir = tmp_path / "run"
    args = [f"--config={config_file}", f"--workdir={workdir}", "--config.log.progress=true"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",  # compile once for all the processes:
           "JAX_COMPILATION_CACHE_DIR": str(directory / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    # (moment, N, expected exit status, the step the run resumes from, checkpoints left afterwards)
    chain = [(("kill-mid-step", "6"), -signal.SIGKILL, None, [4]),
             (("kill-mid-save", "8"), -signal.SIGKILL, 4, [4]),
             (("term-at-step", "2"), EXIT_STATUS, 4, [4, 6]),
             (("kill-after-save", "8"), -signal.SIGKILL, 6, [4, 6, 8])]
    for driver, status, resumed_from, steps in chain:
        proc = run_cli(args, env, driver)
        report = f"{driver}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert proc.returncode == status, report
        assert "Traceback" not in proc.stderr, report
        if resumed_from is not None:
            assert f"resumed from checkpoint step {resumed_from} in" in proc.stderr, report
        assert checkpoint_steps(workdir) == steps, report
        if status == EXIT_STATUS:
            last = proc.stderr.strip().splitlines()[-1]
            assert last == f"launch.train: stopped by SIGTERM at step 6; checkpoint {workdir / 'checkpoints' / '6'}", \
                report
            assert "received SIGTERM again: still writing the checkpoint" in proc.stderr, report

    # the last rerun of the same command runs in this process, which compiles the step once for it and the reference
    assert train_cli.main(args) == 0
    assert "resumed from checkpoint step 8 in" in capsys.readouterr().err
    assert checkpoint_steps(workdir) == [6, 8, 12]
    reference = train(tiny_config(*corpus), tmp_path / "uninterrupted")
    resumed = load_run(workdir).params
    diffs = [jax.tree_util.keystr(p) for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(
        jax.device_get(reference.params))[0], jax.tree.leaves(jax.device_get(resumed))) if not np.array_equal(a, b)]
    assert not diffs, f"parameters differ from the uninterrupted run's: {diffs}"


def test_signals_only_raise_a_flag_while_stop_signals_are_installed():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop(sync_point=False) and stop.name == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step_with_one_collective_checkpoint(tmp_path):
    from test_distributed import _start_two

    workdir = tmp_path / "two"
    procs = _start_two(["-m", "launch.train"], workdir, ["--config.train.steps=400", "--config.log.progress=true"])
    try:
        deadline = time.monotonic() + 300
        while not (workdir / "checkpoints" / "5").is_dir():  # both processes are training
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)  # only one process is told
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [EXIT_STATUS, EXIT_STATUS], [e[-2000:] for e in errs]
    lasts = [e.strip().splitlines()[-1] for e in errs]
    step = int(lasts[0].split(" at step ")[1].split(";")[0])
    assert lasts == [f"launch.train: stopped by SIGTERM at step {step}; checkpoint {workdir / 'checkpoints' / str(step)}"]\
        * 2, lasts
    assert checkpoint_steps(workdir)[-1] == step and 5 <= step < 400  # the signal may land at step 5's own stop check
    assert load_run(workdir).params is not None
