"""The parallelism plan: one device mesh and one table from logical axis names to mesh axes.

Layers only name their axes (`embed`, `mlp`, `heads`, ...); this table decides where each goes, so a
new plan (pure data parallel, FSDP, FSDP x tensor, experts) never touches a layer.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Ordered: flax applies the rules in this order and skips a rule whose mesh axes an array already uses, so
# `expert` comes first and an expert weight's embed axis falls back from (fsdp, expert) to plain fsdp.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("expert", "expert"),
    ("act_expert", "expert"),
    # activations
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_tokens", ("data", "fsdp")),  # flattened batch*length inside MoE dispatch
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "expert")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)


class MeshError(ValueError):
    pass


def mesh_shape(sizes: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
    """Resolves axis sizes in MESH_AXES order; exactly one axis may be -1 (= the remaining devices)."""
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"mesh: unknown axis {unknown}; axes are {MESH_AXES}")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    if shape.count(-1) > 1:
        raise MeshError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    for a, s in zip(MESH_AXES, shape):
        if s == 0 or s < -1:
            raise MeshError(f"mesh: axis {a}={s} must be positive or -1")
    fixed = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if n_devices % fixed:
            raise MeshError(f"mesh: {n_devices} devices are not divisible by the fixed axes' product {fixed}")
        shape[shape.index(-1)] = n_devices // fixed
    elif fixed != n_devices:
        raise MeshError(f"mesh: axes {dict(zip(MESH_AXES, shape))} need {fixed} devices, {n_devices} available")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def parse_mesh(text: str) -> dict[str, int]:
    """`tensor=2,fsdp=4` -> {"tensor": 2, "fsdp": 4}, the command-line form of a config's mesh section."""
    sizes = {}
    for part in text.split(","):
        axis, sep, size = part.partition("=")
        if not sep or not size.strip().lstrip("-").isdigit():
            raise MeshError(f"--mesh: {part!r} is not axis=size (e.g. tensor=2,fsdp=4)")
        sizes[axis.strip()] = int(size)
    return sizes


def logical_to_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
    return nn.logical_to_mesh_axes(logical_axes, LOGICAL_AXIS_RULES)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, _drop_trivial(mesh, logical_to_spec(logical_axes)))


def _drop_trivial(mesh: Mesh, spec: PartitionSpec) -> PartitionSpec:
    """Removes size-1 mesh axes from a spec (purely cosmetic; keeps specs readable in logs)."""
    out = []
    for entry in spec:
        names = entry if isinstance(entry, tuple) else (entry,)
        kept = tuple(n for n in names if n is not None and mesh.shape[n] > 1)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*out)


def state_shardings(mesh: Mesh, abstract_state: Any) -> Any:
    """NamedShardings for a pytree whose leaves may be `nn.Partitioned` boxes (logical names) or plain arrays
    (replicated). Works on params and on optax states built from boxed params alike."""
    logical_specs = nn.get_partition_spec(abstract_state)
    return jax.tree.map(
        lambda spec: logical_sharding(mesh, tuple(spec)), logical_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split on `mesh`: the product of the mesh axes the table gives `act_batch`."""
    spec = logical_to_spec(("act_batch",))
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return math.prod(mesh.shape[a] for a in axes if a is not None)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, length, ...] input: batch over the data-parallel axes, the rest replicated."""
    return logical_sharding(mesh, ("act_batch",) + (None,) * (ndim - 1))


@contextlib.contextmanager
def activate(mesh: Mesh):
    """Mesh + logical rules in scope, so `nn.with_logical_constraint` inside the model resolves."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield
