"""Multi-process training on jax.distributed: 2 local processes x 4 simulated CPU devices (gloo collectives)
against one process with 8, on configs/default.py shrunk to compile in seconds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ultrathink_jax.config_files import parse_config_args
from ultrathink_jax import sharding
from ultrathink_jax.train import load_run, train

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "distributed_driver.py"
STEPS = 10
OVERRIDES = [
    f"--config.train.steps={STEPS}", "--config.checkpoint.every_steps=5", "--config.checkpoint.async_save=false",
    "--config.train.sample_tokens=0", "--config.log.every_steps=1", "--config.log.tensorboard=false",
    "--config.eval.every_steps=0", "--config.eval.max_batches=1", "--config.data.default_corpus_max_chars=60000",
    "--config.data.vocab_size=300", "--config.data.eval_max_chars=20000", "--config.data.seq_len=32", "--config.model.max_seq_len=32",
    "--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
    "--config.model.n_kv_heads=1", "--config.model.d_ff=64", "--config.log.peak_tflops=1",
]
TOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def _start_two(argv: list[str], workdir: Path, extra: list[str] = ()) -> list[subprocess.Popen]:
    address = f"localhost:{_free_port()}"
    return [subprocess.Popen([sys.executable, *argv, f"--workdir={workdir}", "--config=configs/default.py",
                              *OVERRIDES, *extra, f"--coordinator_address={address}", "--num_processes=2",
                              f"--process_id={i}"], cwd=REPO, env=_env(4), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]


def _train_two(workdir: Path) -> dict[int, float]:
    losses = workdir.parent / f"{workdir.name}-losses.json"
    procs = _start_two([str(DRIVER), f"--losses={losses}"], workdir)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return {int(k): v for k, v in json.loads(losses.read_text()).items()}


def _train_one(workdir: Path) -> tuple[dict[int, float], object]:
    import argparse

    _, config = parse_config_args(argparse.ArgumentParser(), ["--config=configs/default.py", *OVERRIDES])
    result = train(config, workdir)
    return result.losses, result.params


def _params(workdir: Path, step: int):
    return load_run(workdir, step, sharding.make_mesh({"fsdp": -1})).params


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                                            a, b)))


def _assert_losses_equal(got: dict[int, float], want: dict[int, float]):
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    diffs = {s: abs(got[s] - want[s]) for s in want}
    assert max(diffs.values()) <= TOL, {s: (got[s], want[s]) for s in want}


def _only_checkpoint(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` whose latest checkpoint is `step` (as if it had stopped there)."""
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) > step:
            shutil.rmtree(d)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    one_losses, _ = _train_one(root / "one")
    two_losses = _train_two(root / "two")
    return root, one_losses, two_losses


def test_two_processes_train_like_one_process_with_eight_devices(runs):
    root, one_losses, two_losses = runs
    assert len(one_losses) == STEPS
    _assert_losses_equal(two_losses, one_losses)
    diff = _max_diff(_params(root / "two", STEPS), _params(root / "one", STEPS))
    assert diff <= TOL, f"final params differ by {diff}"
    print(f"losses 1 process: {one_losses}\nlosses 2 processes: {two_losses}\nmax loss diff "
          f"{max(abs(two_losses[s] - one_losses[s]) for s in one_losses):.2e}, max param diff {diff:.2e}")


def test_two_process_checkpoint_resumes_in_one_process_and_back(runs):
    root, one_losses, _ = runs
    # 2 processes wrote step 5 -> one process continues to 10
    losses, _ = _train_one(_only_checkpoint(root / "two", root / "two-then-one", 5))
    _assert_losses_equal(losses, {s: v for s, v in one_losses.items() if s > 5})
    assert _max_diff(_params(root / "two-then-one", STEPS), _params(root / "one", STEPS)) <= TOL
    # one process wrote step 5 -> 2 processes continue to 10
    losses = _train_two(_only_checkpoint(root / "one", root / "one-then-two", 5))
    _assert_losses_equal(losses, {s: v for s, v in one_losses.items() if s > 5})
    assert _max_diff(_params(root / "one-then-two", STEPS), _params(root / "one", STEPS)) <= TOL


def test_killing_one_process_ends_the_other_with_one_clear_line(tmp_path):
    heartbeat = 4
    procs = _start_two(["-m", "launch.train"], tmp_path / "run",
                       ["--config.train.steps=100000", "--config.log.progress=true",
                        f"--heartbeat_timeout={heartbeat}"])
    main, peer = procs
    os.set_blocking(main.stderr.fileno(), True)
    seen = ""
    deadline = time.monotonic() + 240
    while "step 2/" not in seen:  # both processes are past compilation, inside the collective steps
        line = main.stderr.readline()
        assert line and time.monotonic() < deadline, seen[-3000:] + peer.communicate()[1][-2000:]
        seen += line
    peer.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = main.communicate(timeout=heartbeat + 60)
    seconds = time.monotonic() - killed
    peer.wait()
    lines = [l for l in err.splitlines() if "error:" in l]
    assert main.returncode == 3, err[-3000:]
    assert lines == [f"launch.train: error: process(es) [1] of 2 stopped responding (no heartbeat for {heartbeat}s)"
                     "; exiting (process 0). Rerun the same commands to resume from the last checkpoint."], err[-3000:]
    assert seconds < heartbeat + 15, seconds
    print(f"process 0 exited {seconds:.1f}s after process 1 was killed")


def test_train_eval_generate_clis_run_on_eight_devices_in_one_process(runs):
    root, _, _ = runs
    workdir = _only_checkpoint(root / "one", root / "cli", STEPS)

    def cli(*argv):
        done = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=_env(8), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    # peak_tflops=0: the measured-matmul peak under the 8-device mesh (it used to crash here)
    err = cli("launch.train", "--config=configs/default.py", f"--workdir={workdir}", *OVERRIDES,
              "--config.log.peak_tflops=0", f"--config.train.steps={STEPS + 2}").stderr
    assert f"done: steps {STEPS}->{STEPS + 2}" in err and "peak: measured f32 matmul" in err, err[-2000:]
    out = cli("launch.eval", f"--workdir={workdir}").stdout
    assert out.startswith(f"step {STEPS + 2}: loss "), out
    out = cli("launch.generate", f"--workdir={workdir}", "--prompt=def ", "--max_new_tokens=4",
              "--temperature=0").stdout
    assert out.startswith("def "), out


def test_distributed_settings_come_from_flags_else_the_environment_and_must_be_complete():
    from ultrathink_jax.distributed import DistributedError, settings_from

    def triple(s):
        return s.coordinator_address, s.num_processes, s.process_id

    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert triple(settings_from(environ=env)) == ("h:1", 4, 2)
    assert triple(settings_from(process_id=3, environ=env)) == ("h:1", 4, 3)
    assert triple(settings_from(environ={})) == (None, None, None)
    with pytest.raises(DistributedError, match=r"incomplete: also give \['num_processes', 'process_id'\]"):
        settings_from("h:1", environ={})
    with pytest.raises(DistributedError, match=r"process_id=4 must be in \[0, num_processes=4\)"):
        settings_from(process_id=4, environ=env)


def test_incomplete_distributed_flags_are_one_error_line(capsys):
    from launch import train as train_cli

    assert train_cli.main(["--coordinator_address=localhost:1", "--config.train.steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("launch.train: error: distributed settings"), err
