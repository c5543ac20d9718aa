"""LayerSkip training: exit losses through the shared head, schedules, layer dropout, and the step it changes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ultrathink_jax import losses, sharding
from ultrathink_jax.config import ConfigError, ModelConfig
from ultrathink_jax.model import Transformer
from ultrathink_jax.train import layerskip
from ultrathink_jax.train.config import sections
from ultrathink_jax.train.state import init_state, state_shardings
from ultrathink_jax.train.steps import global_batch, jit_train_step, make_train_step

DENSE = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16)
MOE = dataclasses.replace(DENSE, n_experts=4, n_experts_per_tok=2, moe_every=2)  # stage moe_units: (dense, MoE) x 2
ROWS, SEQ = 8, 16


def batch(config, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, config.vocab_size, (ROWS, SEQ + 1), dtype=np.int32)
    ones = np.ones((ROWS, SEQ), np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones,
            "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (ROWS, SEQ)).copy(),
            "weights": ones.astype(np.float32)}


TX = optax.sgd(1.0)  # new params = params - grads


@functools.lru_cache(maxsize=None)
def compiled_step(config, ls, mesh, accum):
    return jit_train_step(make_train_step(config, TX, lambda s: 1.0, accum, 0.0, ls),
                          state_shardings(config, TX, mesh), mesh)


def run_step(config, ls, mesh, accum=1, state=None, step=0):
    with sharding.activate(mesh):
        state = init_state(config, TX, mesh, seed=0) if state is None else jax.tree.map(jnp.copy, state)
        state = state.replace(step=jnp.asarray(step, jnp.int32))
        return jax.device_get(compiled_step(config, ls, mesh, accum)(state, global_batch(batch(config), mesh)))


def one_device():
    return sharding.make_mesh({}, jax.devices()[:1])


def truncated_ce(config, params, b, n_layers):
    """Cross-entropy of the plain model cut after `n_layers` layers (its stacked params sliced): what exit
    n_layers - 1 must compute. Unit boundaries must align (true for the configs here)."""
    short = dataclasses.replace(config, n_layers=n_layers)
    from ultrathink_jax.model import layer_plan
    cut = {**params, **{s.name: jax.tree.map(lambda a: a[:s.n_units], params[s.name]) for s in layer_plan(short)}}
    logits, _, _ = jax.jit(Transformer(short).apply)({"params": cut}, b["inputs"], b["positions"], b["segment_ids"])
    ce, w = losses.cross_entropy(logits, b["targets"], b["weights"])
    return float(ce / w)


def test_layerskip_is_off_by_default():
    train = sections()["train"]
    assert layerskip.from_train_config(train, DENSE.n_layers) is None


def test_requested_exits_and_an_all_keep_mask_leave_the_logits_bit_for_bit_unchanged():
    mesh = one_device()
    params = init_state(DENSE, optax.sgd(1.0), mesh, 0).params
    b = batch(DENSE)
    apply = jax.jit(Transformer(DENSE).apply)
    plain, _, _ = apply({"params": params}, b["inputs"], b["positions"], b["segment_ids"])
    cfg = layerskip.LayerSkipConfig(exit_layers=(1,), layer_dropout_max=0.5)
    keep = {k: jnp.ones_like(v) for k, v in layerskip.layer_keep(cfg, DENSE, jax.random.key(0), ROWS).items()}
    with_exits, aux, _ = apply({"params": params}, b["inputs"], b["positions"], b["segment_ids"],
                               layer_keep=keep, exits=jnp.asarray([1, 2]))
    assert aux["exit_logits"].shape == (2, ROWS, SEQ, DENSE.vocab_size)
    assert np.array_equal(np.asarray(plain), np.asarray(with_exits))


@pytest.mark.parametrize("config", [DENSE, MOE], ids=["dense", "moe"])
def test_exit_loss_is_the_cross_entropy_of_the_model_cut_at_that_layer(config):
    mesh = one_device()
    state = init_state(config, optax.sgd(1.0), mesh, 0)
    b = batch(config)
    exits = (1, 2) if config is DENSE else (1,)  # the MoE model's layer 2 is inside a unit: no sliced twin
    expected = {l: truncated_ce(config, state.params, b, l + 1) for l in exits}
    ls = layerskip.LayerSkipConfig(exit_layers=exits, schedule="all")
    _, m = run_step(config, ls, mesh, state=state)
    got = dict(zip(m["exit_layers"].tolist(), m["exit_loss"].tolist()))
    for l in expected:
        assert got[l] == pytest.approx(expected[l], abs=1e-5), (l, got, expected)
    assert layerskip.exit_scalars(m).keys() == {f"train/exit_loss_layer{l}" for l in exits}


def test_rotate_activates_one_exit_per_step_and_curriculum_adds_shallower_exits_over_time():
    rot = layerskip.LayerSkipConfig(exit_layers=(0, 1, 2), schedule="rotate")
    for step in range(5):
        layers, on, slot = layerskip.active_exits(rot, jnp.int32(step))
        assert layers.tolist() == [(0, 1, 2)[step % 3]] and on.tolist() == [1.0] and slot.tolist() == [step % 3]
    cur = layerskip.LayerSkipConfig(exit_layers=(0, 1, 2), schedule="curriculum", curriculum_steps=30)
    active = {s: layerskip.active_exits(cur, jnp.int32(s))[1].tolist() for s in (0, 10, 19, 20, 100)}
    assert active == {0: [0, 0, 1], 10: [0, 1, 1], 19: [0, 1, 1], 20: [1, 1, 1], 100: [1, 1, 1]}, active
    weights = layerskip.exit_weights(dataclasses.replace(cur, scale=2.0), DENSE, jnp.asarray([0, 1, 2]),
                                     jnp.ones(3))
    assert np.allclose(weights, [2 * 1 / 4, 2 * 2 / 4, 2 * 3 / 4])


def test_rotating_exit_changes_the_objective_and_reports_only_the_active_exit():
    mesh = one_device()
    ls = layerskip.LayerSkipConfig(exit_layers=(0, 2), schedule="rotate", scale=1.0)
    plain_state, plain = run_step(DENSE, None, mesh)
    state, m = run_step(DENSE, ls, mesh, step=1)
    assert m["exit_tokens"].tolist() == [0.0, ROWS * SEQ], m["exit_tokens"]
    assert float(m["loss"]) == pytest.approx(float(plain["loss"]), abs=1e-6)  # "loss" stays the final layer's CE
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(state.params),
                                                            jax.tree.leaves(plain_state.params)))
    assert diff > 1e-4, "the exit loss did not reach the gradient"


def test_layer_dropout_rate_grows_with_depth_and_is_a_function_of_the_step_rng():
    ls = layerskip.LayerSkipConfig(layer_dropout_max=0.6)
    assert np.allclose(layerskip.dropout_rates(ls, DENSE), [0, 0.2, 0.4, 0.6])
    keep = lambda seed: np.asarray(layerskip.layer_keep(ls, DENSE, jax.random.key(seed), 4096)["layers"][:, 0])
    k = keep(0)
    assert np.array_equal(k, keep(0)) and not np.array_equal(k, keep(1))
    assert k[0].all()
    assert np.allclose(1 - k.mean(axis=1), [0, 0.2, 0.4, 0.6], atol=0.03), 1 - k.mean(axis=1)
    moe_keep = layerskip.layer_keep(ls, MOE, jax.random.key(0), 8)
    assert moe_keep["moe_units"].shape == (2, 2, 8)




def test_exit_losses_accumulate_exactly_over_micro_batches():
    mesh = one_device()
    ls = layerskip.LayerSkipConfig(exit_layers=(1, 2), schedule="all")
    one, m1 = run_step(DENSE, ls, mesh, accum=1)
    two, m2 = run_step(DENSE, ls, mesh, accum=2)
    assert np.allclose(m1["exit_loss"], m2["exit_loss"], atol=1e-5), (m1["exit_loss"], m2["exit_loss"])
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)))
    assert worst < 1e-5, worst


def test_layer_dropout_changes_the_step_and_repeats_it_exactly_for_the_same_step():
    mesh = one_device()
    ls = layerskip.LayerSkipConfig(exit_layers=(0, 2), schedule="all", layer_dropout_max=0.5)
    _, a = run_step(DENSE, ls, mesh, step=3)
    _, again = run_step(DENSE, ls, mesh, step=3)
    _, other = run_step(DENSE, ls, mesh, step=4)
    assert float(a["loss"]) == float(again["loss"]), "same step, same RNG: a resumed run must skip the same layers"
    assert float(a["loss"]) != float(other["loss"])


def test_sharded_layerskip_step_equals_one_device():
    ls = layerskip.LayerSkipConfig(exit_layers=(0, 2), schedule="all", layer_dropout_max=0.5)
    ref, m_ref = run_step(DENSE, ls, one_device())
    got, m = run_step(DENSE, ls, sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    assert float(m["loss"]) == pytest.approx(float(m_ref["loss"]), abs=1e-5)
    assert np.allclose(m["exit_loss"], m_ref["exit_loss"], atol=1e-5)
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params)))
    assert worst < 1e-5, worst


@pytest.mark.parametrize("field,value,message", [
    ("early_exit_layers", "1,x", "comma-separated"),
    ("early_exit_layers", "3", "outside [0, n_layers - 1 = 3)"),
    ("early_exit_scale", 0.0, "must be positive"),
    ("early_exit_schedule", "random", "must be one of"),
    ("early_exit_curriculum_steps", -1, "must be >= 0"),
    ("layer_dropout_max", 1.0, "must be in [0, 1)"),
])
def test_bad_layerskip_values_name_the_field(field, value, message):
    train = sections()["train"]
    train.early_exit_layers = "1"
    train[field] = value
    with pytest.raises(ConfigError, match="train." + field) as e:
        layerskip.from_train_config(train, DENSE.n_layers)
    assert message in str(e.value)
    train = sections()["train"]
    train.update(early_exit_layers="1", early_exit_schedule="curriculum")
    with pytest.raises(ConfigError, match="must be positive with early_exit_schedule='curriculum'"):
        layerskip.from_train_config(train, DENSE.n_layers)


def test_trainer_logs_exit_losses_and_resumes_layer_dropout_exactly(tmp_path, capsys):
    from test_train_fixtures import tiny_config, write_corpus
    from test_train_loop import read_scalars
    from ultrathink_jax.train import train

    corpus = write_corpus(tmp_path / "corpus")
    overrides = {"train.steps": 4, "log.every_steps": 2, "checkpoint.every_steps": 2, "train.early_exit_layers": "0",
                 "train.layer_dropout_max": 0.5, "log.progress": True}
    full = train(tiny_config(*corpus, **overrides), tmp_path / "full")
    console = capsys.readouterr().err
    assert "exit_loss_layer0" in console, console
    scalars = read_scalars(tmp_path / "full" / "tensorboard")
    assert [s for s, _ in scalars["train/exit_loss_layer0"]] == [2, 4]
    train(tiny_config(*corpus, **overrides), tmp_path / "resumed", until_step=2)
    resumed = train(tiny_config(*corpus, **overrides), tmp_path / "resumed")
    assert resumed.losses == {s: full.losses[s] for s in (3, 4)}, (resumed.losses, full.losses)


def test_the_trainer_config_check_covers_the_layerskip_fields():
    from ultrathink_jax.configs import base
    from ultrathink_jax.train.config import validate

    config = base.get_config()
    config.train.early_exit_layers = str(config.model.n_layers - 1)
    with pytest.raises(ConfigError, match="train.early_exit_layers"):
        validate(config)
