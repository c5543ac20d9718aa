"""The pure training step: token-weighted gradient accumulation, the weight-decay mask, schedules, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ultrathink_jax import sharding
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.data import pack_documents, pack_row
from ultrathink_jax.train.config import sections
from ultrathink_jax.train.optim import decay_mask, learning_rate_schedule, make_optimizer
from ultrathink_jax.train.state import abstract_state, init_state, state_shardings
from ultrathink_jax.train.steps import jit_train_step, make_train_step, global_batch

CONFIG = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16)
ROWS, SEQ = 32, 16


def packed_batch(seed: int = 0) -> dict:
    """ROWS packed rows of random documents of random lengths: several segments and zero weights per row."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, CONFIG.vocab_size, size=rng.integers(3, 30)).tolist() for _ in range(60)]
    stream = pack_documents(docs, eos_id=0, vocab_size=CONFIG.vocab_size)
    rows = [pack_row(stream, r, SEQ, pad_id=0) for r in range(ROWS)]
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def test_four_accumulated_micro_batches_equal_one_four_times_larger_batch():
    mesh = sharding.make_mesh({}, jax.devices()[:1])  # the arithmetic does not depend on the mesh; compiles fast
    tx = optax.sgd(1.0)  # new params = params - grads: the update exposes the gradient itself
    batch = packed_batch()
    with sharding.activate(mesh):
        state = init_state(CONFIG, tx, mesh, seed=0)
        results = {}
        for accum in (1, 4):
            step = jit_train_step(make_train_step(CONFIG, tx, lambda s: 1.0, accum, z_loss_weight=0.0),
                                  state_shardings(CONFIG, tx, mesh), mesh)
            results[accum] = jax.device_get(step(jax.tree.map(jnp.copy, state), global_batch(batch, mesh)))
    (one, m1), (four, m4) = results[1], results[4]
    assert m1["tokens"] == m4["tokens"] == batch["weights"].sum()
    assert abs(float(m1["loss"]) - float(m4["loss"])) < 1e-5, f"loss {m1['loss']} vs {m4['loss']}"
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), one.params, four.params)
    worst = max(jax.tree.leaves(diffs))
    assert worst < 1e-5, f"largest gradient difference {worst:.3g}: {diffs}"


def test_weight_decay_skips_norm_scales_but_covers_embeddings_and_matrices():
    params = abstract_state(CONFIG, optax.identity(), sharding.make_mesh({"fsdp": -1})).params
    mask = decay_mask(params)
    flat = {jax.tree_util.keystr(path): decays for path, decays in jax.tree_util.tree_leaves_with_path(mask)}
    no_decay = sorted(k for k, v in flat.items() if not v)
    assert no_decay == ["['layers']['block_0']['input_layernorm']['scale']",
                        "['layers']['block_0']['post_attention_layernorm']['scale']", "['norm']['scale']"], no_decay
    assert flat["['embed_tokens']['embedding']"] and flat["['lm_head']['kernel']"]
    assert flat["['layers']['block_0']['self_attn']['q_proj']['kernel']"]


def optim(**overrides) -> ml_collections.ConfigDict:
    o = sections()["optim"]
    o.update({"learning_rate": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1, **overrides})
    return o


@pytest.mark.parametrize("kind, mid, end", [("cosine", 0.55, 0.1), ("linear", 0.55, 0.1), ("constant", 1.0, 1.0)])
def test_schedule_warms_up_linearly_then_decays_to_the_floor(kind, mid, end):
    lr = learning_rate_schedule(optim(schedule=kind), total_steps=110)
    values = [float(lr(s)) for s in (0, 4, 9, 60, 110, 500)]
    assert values[:3] == pytest.approx([0.1, 0.5, 1.0]), values
    assert values[3:] == pytest.approx([mid, end, end], abs=1e-6), values


def first_moment(tx, grads) -> float:
    """Norm of Adam's first moment after one update: (1 - b1) * the gradient that reached Adam."""
    params = jax.tree.map(jnp.zeros_like, grads)
    state = tx.update(grads, tx.init(params), params)[1]
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    return float(optax.tree.norm(adam[0].mu))


def test_global_norm_clipping_rescales_the_gradient_before_adam():
    huge = {"w": jnp.full(4, 1e6)}  # global norm 2e6
    clipped, _ = make_optimizer(optim(grad_clip=1.0), 10)
    unclipped, _ = make_optimizer(optim(grad_clip=0.0), 10)
    assert first_moment(clipped, huge) == pytest.approx(0.1 * 1.0, rel=1e-5)
    assert first_moment(unclipped, huge) == pytest.approx(0.1 * 2e6, rel=1e-5)


def test_bf16_compute_keeps_float32_params_and_optimizer_state():
    config = ModelConfig(**{**CONFIG.__dict__, "dtype": "bfloat16"})
    mesh = sharding.make_mesh({"fsdp": -1})
    tx, _ = make_optimizer(optim(), 100)
    state = abstract_state(config, tx, mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in packed_batch().items()}
    with sharding.activate(mesh):
        new_state, metrics = jax.eval_shape(make_train_step(config, tx, lambda s: 1.0, 2, 1e-4), state, batch)
    dtypes = {str(x.dtype) for x in jax.tree.leaves((new_state.params, new_state.opt_state))}
    assert dtypes <= {"float32", "int32"}, dtypes
    assert metrics["loss"].dtype == jnp.float32 and "z_loss" in metrics


def test_aux_loss_free_bias_moves_by_the_rate_toward_balance_and_only_the_step_moves_it():
    """With router_bias_update_rate the jitted step changes each layer's selection bias by exactly
    +-rate * sign(mean load - load) (AdamW with weight decay would otherwise shrink it) and reports the counts."""
    cfg = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16,
                      n_experts=4, router_bias_update_rate=0.01)
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    tx = optax.adamw(1e-2, weight_decay=0.5)
    with sharding.activate(mesh):
        state = init_state(cfg, tx, mesh, seed=0)
        step = jit_train_step(make_train_step(cfg, tx, lambda s: 1e-2, 1, z_loss_weight=0.0),
                              state_shardings(cfg, tx, mesh), mesh)
        new, metrics = jax.device_get(step(jax.tree.map(jnp.copy, state), global_batch(packed_batch(), mesh)))
    before = np.asarray(jax.device_get(state.params["moe_units"]["block_0"]["moe"]["selection_bias"]))
    after = new.params["moe_units"]["block_0"]["moe"]["selection_bias"]
    counts = metrics["moe"]["expert_counts"]  # [n_layers, E]
    np.testing.assert_array_equal(before, np.zeros((2, 4), np.float32))
    expected = 0.01 * np.sign(counts.mean(-1, keepdims=True) - counts)
    np.testing.assert_allclose(after, expected, atol=1e-7)
    assert np.abs(after).max() > 0


MOE_ROUTER_LOSSES = dict(n_experts=4, n_experts_per_tok=2, router_aux_loss_weight=0.5, router_z_loss_weight=0.1)


@pytest.mark.parametrize("config", [
    CONFIG,
    dataclasses.replace(CONFIG, **MOE_ROUTER_LOSSES),  # dropless, the balance loss pooled over layers
    dataclasses.replace(CONFIG, **MOE_ROUTER_LOSSES, moe_dispatch="capacity", router_aux_loss_per_layer=True),
], ids=["dense", "moe dropless", "moe capacity per-layer balance"])
def test_row_groups_give_the_same_step_as_one_group(config):
    """The MoE router losses are not sums over tokens: with groups they come from the groups' summed statistics,
    so the step is the one-group step (a per-group balance loss, summed, differs by about 1e-3 here)."""
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    tx = optax.sgd(1.0)  # the update exposes the gradient itself
    batch = packed_batch()
    with sharding.activate(mesh):
        state = init_state(config, tx, mesh, seed=0)
        results = {}
        for groups in (1, 4):
            step = jit_train_step(make_train_step(config, tx, lambda s: 1.0, 2, z_loss_weight=1e-2,
                                                  row_groups=groups), state_shardings(config, tx, mesh), mesh)
            results[groups] = jax.device_get(step(jax.tree.map(jnp.copy, state), global_batch(batch, mesh)))
    (one, m1), (four, m4) = results[1], results[4]
    assert m1["tokens"] == m4["tokens"]
    for key in ("loss", "z_loss") + (("moe_loss",) if config.n_experts else ()):
        assert abs(float(m1[key]) - float(m4[key])) < 1e-6 * abs(float(m1[key])), (key, m1[key], m4[key])
    worst = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), one.params, four.params)))
    assert worst < 1e-6, f"largest gradient difference {worst:.3g}"


def test_row_groups_auto_only_where_groups_change_nothing(monkeypatch):
    from ultrathink_jax.train import steps

    monkeypatch.setattr(steps.jax, "device_count", lambda: 1)  # as in a one-device CPU run
    monkeypatch.setattr(steps, "cpu_cores", lambda: 2)
    assert steps.resolve_row_groups(0, CONFIG, None, 16) == 2  # one group per core
    dropless = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, n_experts=4)
    assert steps.resolve_row_groups(0, dropless, None, 16) == 4  # two per core: its tile matmuls use one core each
    capacity = dataclasses.replace(dropless, moe_dispatch="capacity")
    assert steps.resolve_row_groups(0, capacity, None, 16) == 2
    monkeypatch.setattr(steps, "cpu_cores", lambda: 16)
    assert steps.resolve_row_groups(0, CONFIG, None, 16) == steps.CPU_ROW_GROUPS  # at most 4
    assert steps.resolve_row_groups(0, CONFIG, None, 6) == 3  # the largest divisor of the rows up to 4
    moe = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, n_experts=4)
    assert steps.resolve_row_groups(0, moe, None, 16) == 4  # router losses from the groups' summed statistics
    jittered = dataclasses.replace(moe, router_jitter=0.1)
    assert steps.resolve_row_groups(0, jittered, None, 16) == 1  # each group would draw its own jitter
    assert steps.resolve_row_groups(0, CONFIG, object(), 16) == 1  # LayerSkip: one dropout mask per group
    assert steps.resolve_row_groups(2, moe, None, 16) == 2  # an explicit value is taken as given
    with pytest.raises(ValueError, match="train.row_groups=3 must divide the micro-batch's 16 rows"):
        steps.resolve_row_groups(3, CONFIG, None, 16)
    monkeypatch.setattr(steps.jax, "device_count", lambda: 8)
    assert steps.resolve_row_groups(0, CONFIG, None, 16) == 1  # many devices: the mesh already splits the rows
