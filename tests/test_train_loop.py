"""The training loop end to end on a tiny model: loss falls, resume is exact (non-finite steps: test_train_nonfinite)."""

import json
import math
import struct

import numpy as np
import pytest

from test_train_fixtures import tiny_config, write_corpus
from ultrathink_jax.train import checkpoint_steps, train

STEPS = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run_full")
    return workdir, train(tiny_config(*corpus), workdir)


def test_short_run_lowers_the_training_loss(uninterrupted):
    _, result = uninterrupted
    losses = [result.losses[s] for s in range(1, STEPS + 1)]
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < first - 1.0, f"loss did not fall: first 3 steps {first:.3f}, last 3 steps {last:.3f}"


def test_run_ends_with_heldout_loss_and_a_final_checkpoint(uninterrupted):
    workdir, result = uninterrupted
    assert set(result.evals) == {STEPS}, f"evaluated at steps {sorted(result.evals)}"
    assert math.isfinite(result.evals[STEPS]) and result.evals[STEPS] < result.losses[1]
    assert checkpoint_steps(workdir) == [4, 8, 12]
    for name in ("config.json", "model_config.json", "tokenizer/tokenizer.json"):
        assert (workdir / name).is_file(), f"{name} missing from the run directory"


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Scalars of TFRecord event files (length, crc, payload, crc), parsed with tensorboardX's protobufs."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for file in sorted(logdir.glob("events.out.tfevents.*")):
        data = file.read_bytes()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_has_every_training_curve(uninterrupted):
    workdir, result = uninterrupted
    scalars = read_scalars(workdir / "tensorboard")
    expected = {"train/loss", "train/perplexity", "train/learning_rate", "train/grad_norm", "train/param_norm",
                "perf/tokens_per_second", "perf/step_time_s", "perf/mfu", "eval/loss", "eval/perplexity"}
    assert expected <= set(scalars), f"missing TensorBoard tags: {sorted(expected - set(scalars))}"
    assert [s for s, _ in scalars["train/loss"]] == [4, 8, 12]
    assert scalars["train/loss"][-1][1] == pytest.approx(result.losses[12])
    assert all(v > 0 for _, v in scalars["perf/tokens_per_second"][1:]), scalars["perf/tokens_per_second"]


def test_stopping_and_resuming_reproduces_the_uninterrupted_losses(uninterrupted, corpus, tmp_path):
    _, full = uninterrupted
    config = tiny_config(*corpus)
    first = train(config, tmp_path, until_step=5)  # checkpoints at 4 and (on stopping) 5
    assert checkpoint_steps(tmp_path)[-1] == 5
    second = train(config, tmp_path)
    assert second.start_step == 5
    resumed = {**first.losses, **second.losses}
    mismatches = {s: (resumed[s], full.losses[s]) for s in full.losses if resumed[s] != full.losses[s]}
    assert not mismatches, f"per-step losses differ after resume (resumed, uninterrupted): {mismatches}"


@pytest.fixture(scope="module")
def resumed_finished_run(uninterrupted, corpus, tmp_path_factory):
    """The finished run resumed (nothing left to train) with log.progress=False and another data.vocab_size:
    (workdir, console text, warnings logged)."""
    import io
    import logging
    import shutil

    workdir = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(uninterrupted[0], workdir)
    console, records = io.StringIO(), []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("ultrathink_jax").addHandler(handler)
    try:
        train(tiny_config(*corpus, **{"data.vocab_size": 400, "log.progress": False}), workdir, out=console)
    finally:
        logging.getLogger("ultrathink_jax").removeHandler(handler)
    return workdir, console.getvalue(), [r.getMessage() for r in records]


def test_progress_off_still_prints_the_run_messages_and_summary(resumed_finished_run):
    _, console, _ = resumed_finished_run
    assert f"resumed from checkpoint step {STEPS}" in console and "time: tokenizer" in console, console


def test_a_vocab_size_the_workdir_tokenizer_overrides_is_warned_about_and_config_json_keeps_the_real_one(
        resumed_finished_run):
    workdir, _, warnings = resumed_finished_run
    assert any("data.vocab_size=400 is ignored" in w and "(data.vocab_size=300)" in w for w in warnings), warnings
    assert json.loads((workdir / "config.json").read_text())["data"]["vocab_size"] == 300
