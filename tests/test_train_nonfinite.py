"""Non-finite steps: skipped inside the jitted step (params and optimizer state untouched), counted and logged;
`train.max_bad_steps` of them in a row stop the run naming the last good checkpoint; nothing non-finite is ever
checkpointed, and launch.export_hf refuses a checkpoint that holds one."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from test_train_loop import read_scalars
from test_train_fixtures import make_run_dir, tiny_config, write_corpus
from ultrathink_jax.checkpoint import non_finite_leaves
from ultrathink_jax.train import TrainingError, checkpoint_steps, load_run, train
from ultrathink_jax.train import steps as steps_lib

OVERFLOW = np.float32(3e38)  # target weights this large overflow the loss sum to inf (and the loss to nan)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def poison_batches(monkeypatch, calls: set[int]):
    """The batches placed by the loop's calls number `calls` (1-based) get overflowing target weights."""
    placed, real = [], steps_lib.global_batch

    def poisoned(local, mesh):
        placed.append(1)
        if len(placed) in calls:
            local = {**local, "weights": np.where(local["weights"] > 0, OVERFLOW, 0).astype(np.float32)}
        return real(local, mesh)

    monkeypatch.setattr(steps_lib, "global_batch", poisoned)


@pytest.fixture(scope="module")
def poisoned_run(corpus, tmp_path_factory):
    """The tiny run (the same compiled step as test_train_loop's) with overflowing batches 3 and 4, checkpointing
    every 2 steps, console on."""
    workdir = tmp_path_factory.mktemp("poisoned")
    with pytest.MonkeyPatch.context() as monkeypatch:
        poison_batches(monkeypatch, {3, 4})
        console = io.StringIO()
        config = tiny_config(*corpus, **{"checkpoint.every_steps": 2, "checkpoint.max_to_keep": 10,
                                         "log.progress": True})
        return workdir, train(config, workdir, out=console), console.getvalue()


def saved_state(workdir, step):
    manager = ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True),
                                    item_names=("params", "opt_state"))
    try:
        out = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                            opt_state=ocp.args.StandardRestore()))
        return jax.device_get((out["params"], out["opt_state"]))
    finally:
        manager.close()


def test_skipped_steps_leave_params_and_optimizer_state_bitwise_unchanged(poisoned_run):
    workdir, result, _ = poisoned_run
    assert result.skipped == [3, 4], result.skipped
    before, after = saved_state(workdir, 2), saved_state(workdir, 4)  # steps 3 and 4 were both skipped
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(before)[0]]
    changed = [p for p, a, b in zip(paths, jax.tree.leaves(before), jax.tree.leaves(after)) if not np.array_equal(a, b)]
    assert not changed, f"skipped steps changed {changed}"
    assert result.losses[5] < result.losses[1], (result.losses[1], result.losses[5])


def test_skipped_steps_are_counted_logged_and_training_goes_on(poisoned_run):
    workdir, result, console = poisoned_run
    assert result.final_step == 12 and checkpoint_steps(workdir)[-1] == 12
    assert "step 3: non-finite loss nan" in console and "(2 so far)" in console, console
    assert [v for _, v in read_scalars(workdir / "tensorboard")["train/skipped_steps"]] == [2, 2, 2]
    assert not non_finite_leaves(load_run(workdir).params)


def test_a_diverging_learning_rate_stops_after_max_bad_steps_naming_the_last_good_checkpoint(corpus, tmp_path):
    config = tiny_config(*corpus, **{"optim.learning_rate": 1e4, "optim.warmup_steps": 0, "train.steps": 40,
                                     "log.every_steps": 1, "checkpoint.every_steps": 2, "train.max_bad_steps": 3})
    with pytest.raises(TrainingError, match=r"3 consecutive non-finite steps .* reached train.max_bad_steps=3; "
                                            r"last good checkpoint: step \d+ in ") as err:
        train(config, tmp_path)
    steps = checkpoint_steps(tmp_path)
    assert steps and f"step {steps[-1]} in" in str(err.value), (steps, str(err.value))
    for step in steps:
        assert not non_finite_leaves(load_run(tmp_path, step).params), f"checkpoint {step} holds non-finite values"


def test_export_refuses_a_checkpoint_holding_non_finite_values(corpus, tmp_path, capsys):
    from launch import export_hf

    def with_nan(params):
        leaves, tree = jax.tree.flatten(params)
        return jax.tree.unflatten(tree, [leaves[0].at[0].set(jnp.nan)] + leaves[1:])

    make_run_dir(tmp_path / "run", tiny_config(*corpus), transform=with_nan)
    out = tmp_path / "hf"
    assert export_hf.main([f"--workdir={tmp_path / 'run'}", f"--out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("launch.export_hf: error: the newest intact checkpoint of "), err
    assert "holds non-finite values in 1 tensor(s)" in err, err
    assert "\n" not in err and not out.exists()


def test_an_update_that_overflows_the_parameters_stops_the_run_before_anything_is_saved(corpus, tmp_path):
    """A finite loss and gradient are applied in place (steps.py decides before the update); a learning rate of
    3e38 is finite but moves every weight by about 3e38, whose norm overflows: the run stops at that step."""
    config = tiny_config(*corpus, **{"optim.learning_rate": 3e38, "optim.warmup_steps": 0, "train.steps": 6,
                                     "checkpoint.every_steps": 1})
    with pytest.raises(TrainingError, match=r"step 1: the update left non-finite parameters \(param norm inf, .*"
                                            r"nothing saved after it; last good checkpoint: none in "):
        train(config, tmp_path)
    assert checkpoint_steps(tmp_path) == []
