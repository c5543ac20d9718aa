"""The compiled decode loop writes the KV cache in place: no op makes a new copy of a stage's stacked cache.

A cache passed through the layer scan as scanned input/output was sliced, updated and re-stacked (a concatenate or
copy of the whole stage) at every token; carried, each layer's write is one in-place dynamic-update-slice.
Not covered, and not fixed: a stage of a single unit (no preset has one) is still copied, before as now: XLA fuses
the update into the reshape that reads its only slot and runs it twice, once per consumer."""

import re

import jax
import numpy as np
import pytest
from flax import linen as nn

from model_fixtures import tiny_config
from ultrathink_jax.generate import Engine, SamplingConfig
from ultrathink_jax.generate import engine as engine_lib
from ultrathink_jax.model import layer_plan
from ultrathink_jax.params import abstract_params

INSTRUCTION = re.compile(r"^\s*(ROOT )?%(\S+) = \w+\[([\d,]*)\](?:\{[^}]*\})? ([\w\-]+)\((.*)$")
COMPUTATION = re.compile(r"^%(\S+) .*\{$")
IN_PLACE = {"parameter", "get-tuple-element", "tuple", "bitcast", "dynamic-update-slice"}


def parse(hlo: str):
    """({instruction name: (shape, opcode, called computation)}, {computation name: its ROOT's opcode})."""
    ops, roots, current = {}, {}, None
    for line in hlo.splitlines():
        if m := COMPUTATION.match(line):
            current = m.group(1)
        elif m := INSTRUCTION.match(line):
            root, name, dims, opcode, rest = m.groups()
            calls = re.search(r"calls=%([\w.\-]+)", rest)
            ops[name] = (tuple(int(d) for d in dims.split(",") if d), opcode, calls and calls.group(1))
            if root:
                roots[current] = opcode
    return ops, roots


def stage_cache_copies(hlo: str, shapes) -> list[str]:
    """Instructions producing a stacked-cache-shaped array other than by aliasing it or updating it in place
    (a fusion counts as in place when its root is a dynamic-update-slice, which XLA runs on the operand's buffer)."""
    ops, roots = parse(hlo)
    return [f"{name} = {opcode}" for name, (shape, opcode, calls) in ops.items()
            if shape in shapes and opcode not in IN_PLACE and not (opcode == "fusion" and
                                                                   roots.get(calls) == "dynamic-update-slice")]


@pytest.mark.parametrize("overrides", [  # the CPU default unrolls the layer scan; GPU/TPU keep it a loop
    dict(n_layers=4),
    dict(n_layers=6, n_experts=4, n_experts_per_tok=2, moe_d_ff=48, moe_every=2, moe_first_dense=2,
         scan_unroll=1),  # 2 stages of 2 units: 2 dense layers, then 2 x (dense, MoE)
], ids=["dense-unrolled", "moe-rolled"])
def test_decode_loop_updates_the_stacked_cache_in_place(overrides):
    cfg = tiny_config(**overrides)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: np.asarray(rng.normal(size=s.shape) * 0.1, np.float32),
                          nn.unbox(abstract_params(cfg)))
    engine = Engine(params, cfg)
    run = engine.prefill([[1, 2, 3], [4, 5]], 8)
    _, _, decode = engine_lib._programs(cfg, SamplingConfig(), engine.mesh)
    hlo = decode.lower(engine.params, run.state).compile().as_text()
    shapes = {leaf.shape for leaf in jax.tree.leaves(run.state["cache"]["stages"])}
    assert len(shapes) == len({s.n_units for s in layer_plan(cfg)}) and all(len(s) == 5 for s in shapes), shapes
    assert "dynamic-update-slice" in hlo
    copies = stage_cache_copies(hlo, shapes)
    assert not copies, f"decode copies a stage's whole KV cache: {copies}"
