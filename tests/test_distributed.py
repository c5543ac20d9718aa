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
from typing import Sequence

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


def _start_two(argv: list[str], workdir: Path, extra: Sequence[str] = ()) -> list[subprocess.Popen]:
    address = f"localhost:{_free_port()}"
    env = dict(_env(4), HF_DATASETS_CACHE=str(workdir.parent / "hf_cache"))
    return [subprocess.Popen([sys.executable, *argv, f"--workdir={workdir}", "--config=configs/default.py",
                              *OVERRIDES, *extra, f"--coordinator_address={address}", "--num_processes=2",
                              f"--process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]


def _train_two(workdir: Path, extra: Sequence[str] = ()) -> dict[int, float]:
    losses = workdir.parent / f"{workdir.name}-losses.json"
    procs = _start_two([str(DRIVER), f"--losses={losses}"], workdir, extra)
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


def _write_stream_dataset(directory: Path, n_files: int = 4, docs_per_file: int = 100) -> Path:
    """A local Hugging Face json dataset of `n_files` shards (2 processes get 2 whole shards each) of documents
    so short that a few steps read several chunks: a resume must skip into the process's part of the stream."""
    import random

    rng = random.Random(0)
    words = "the cat sat on a mat and a dog ran to the park while birds sang in old trees".split()
    directory.mkdir(parents=True)
    for f in range(n_files):
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(docs_per_file)]
        (directory / f"part-{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return directory


def test_two_processes_streaming_their_own_shards_resume_like_an_uninterrupted_run(tmp_path):
    import argparse

    from ultrathink_jax.data import HFSource, load_tokenizer
    from ultrathink_jax.data.streaming import StreamingTrainIterator

    steps, saved = 4, 2
    extra = [f"--config.data.hf_dataset={_write_stream_dataset(tmp_path / 'stream')}",
             "--config.data.streaming=true", "--config.data.shuffle_buffer_rows=4",
             f"--config.train.steps={steps}", f"--config.checkpoint.every_steps={saved}"]
    full = _train_two(tmp_path / "full", extra)
    resumed = _train_two(_only_checkpoint(tmp_path / "full", tmp_path / "resumed", saved), extra)
    assert resumed == {s: v for s, v in full.items() if s > saved}, (resumed, full)
    assert _max_diff(_params(tmp_path / "resumed", steps), _params(tmp_path / "full", steps)) == 0
    # The checkpoint holds each process's own bounded state, in process order: what an iterator over that
    # process's part of the stream reports after the same rows.
    state = json.loads((tmp_path / "full" / "checkpoints" / str(saved) / "data" / "metadata").read_text())
    _, config = parse_config_args(argparse.ArgumentParser(), ["--config=configs/default.py", *OVERRIDES, *extra])
    d = config.data
    source = HFSource(d.hf_dataset, d.hf_config, d.hf_split, d.text_column, d.streaming, d.max_chars)
    tokenizer = load_tokenizer(tmp_path / "full" / "tokenizer")
    assert len(state["processes"]) == 2, state
    for p, saved_state in enumerate(state["processes"]):
        it = StreamingTrainIterator(source, tokenizer, d, process_index=p, process_count=2)
        for _ in range(saved):
            next(it)
        assert saved_state == json.loads(json.dumps(it.get_state())), (p, saved_state)
        assert saved_state["block_start"]["documents"] > 0, f"process {p}'s resume skips nothing: {saved_state}"
        assert len(saved_state["block_start"]["carry"]) <= d.seq_len, saved_state
    assert state["processes"][0]["stats"] != state["processes"][1]["stats"], "both processes read the same text"
    assert len(json.dumps(state)) < 3000, len(json.dumps(state))


def _service_processes(address: str) -> list[str]:
    """Live coordination-service processes (coordination_service.py) serving `address`'s port."""
    port = address.rsplit(":", 1)[1]
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode().split("\0")
        except OSError:  # exited meanwhile
            continue
        if any(a.endswith("coordination_service.py") for a in argv) and any(a.endswith(f":{port}") for a in argv):
            found.append(cmdline.parent.name)
    return found


@pytest.mark.parametrize("victim", [0, 1])
def test_killing_either_process_ends_the_other_with_one_clear_line(tmp_path, victim):
    heartbeat = 4
    procs = _start_two(["-m", "launch.train"], tmp_path / "run",
                       ["--config.train.steps=100000", "--config.log.progress=true",
                        f"--heartbeat_timeout={heartbeat}"])
    address = next(a for a in procs[0].args if a.startswith("--coordinator_address=")).split("=", 1)[1]
    survivor = procs[1 - victim]
    os.set_blocking(procs[0].stderr.fileno(), True)
    seen = ""
    deadline = time.monotonic() + 240
    while "step 2/" not in seen:  # both processes are past compilation, inside the collective steps
        line = procs[0].stderr.readline()
        assert line and time.monotonic() < deadline, seen[-3000:] + procs[1].communicate()[1][-2000:]
        seen += line
    procs[victim].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = survivor.communicate(timeout=heartbeat + 60)
    seconds = time.monotonic() - killed
    procs[victim].wait()
    assert survivor.returncode == 3, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last == (f"launch.train: error: process(es) [{victim}] of 2 stopped responding (no heartbeat for "
                    f"{heartbeat}s); exiting (process {1 - victim}). Rerun the same commands to resume from the "
                    "last checkpoint."), err[-3000:]
    assert "Terminating process" not in err and "stack trace" not in err, err[-3000:]
    assert seconds < heartbeat + 15, seconds
    # process 0's coordination service process does not outlive the job
    while _service_processes(address) and time.monotonic() < killed + heartbeat + 15:  # it lingers at most +30
        time.sleep(0.2)
    assert not _service_processes(address), f"coordination service for {address} still running"
    print(f"process {1 - victim} exited {seconds:.1f}s after process {victim} was killed")


def test_a_coordinator_port_taken_by_another_program_is_one_error_line():
    from ultrathink_jax.coordination_service import ServiceProcess, ServiceStartError

    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::", 0))
        taken.listen()
        address = f"[::]:{taken.getsockname()[1]}"
        with pytest.raises(ServiceStartError, match=rf"the coordination service on \[::\]:\d+ did not start: \S"):
            ServiceProcess(address, 2, heartbeat_timeout=5, shutdown_timeout=10, recoverable=True)
    assert not _service_processes(address)


def test_an_unreachable_coordinator_is_one_error_line_after_the_init_timeout(tmp_path):
    address = f"localhost:{_free_port()}"  # nothing listens there
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "launch.train", f"--workdir={tmp_path / 'run'}",
                           f"--coordinator_address={address}", "--num_processes=2", "--process_id=1",
                           "--init_timeout=2"], cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"launch.train: error: cannot reach the coordinator at {address} within 2s ([Errno 111] Connection "
        "refused): is process 0 running, and its address reachable from this host?"], done.stderr[-3000:]
    assert time.monotonic() - start < 60


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


def test_a_jax_whose_runtime_factories_moved_initializes_unwrapped_with_a_warning(monkeypatch):
    from jax._src import distributed as jax_distributed

    from ultrathink_jax import distributed

    monkeypatch.setattr(jax_distributed, "_jax", object())  # neither factory present
    with pytest.warns(RuntimeWarning, match="cannot be wrapped"):
        with distributed._runtime_factories():
            pass
    monkeypatch.undo()
    module = jax_distributed._jax
    before = module.get_distributed_runtime_service
    with distributed._runtime_factories():
        assert module.get_distributed_runtime_service is not before  # swapped for the call...
    assert module.get_distributed_runtime_service is before  # ...and restored after it
