"""Running the experts: two implementations of one interface.

Both take tokens grouped by sequence, x [B, T, D], the router's choices (index/weight [B, T, k]) and the
stacked SwiGLU expert weights (wi_gate/wi_up [E, D, F], wo [E, F, D]) and return (y [B, T, D], dropped),
where `dropped` counts valid token-expert assignments that were not computed.

- `dropless`: every assignment is computed. Assignments are sorted by expert and the three projections
  are grouped matmuls: `jax.lax.ragged_dot` on GPU/TPU (no FLOP wasted on padding), and on CPU, where
  ragged_dot becomes a dense product over all experts, a tiled batched matmul (`_tiled_experts`); on CPU no more
  assignments than experts (decode at small batches) skip the sort and gather each one's expert weights instead,
  and up to a few hundred (decode at larger batches) every expert runs on every token (`grouped_matmul_impl`
  says which, by static shape). Under a mesh it runs
  in `shard_map`: each device sorts and computes its own tokens (the batch axes, `expert` included, act as
  data parallelism) with the expert weights gathered ZeRO-3 style and their intermediate size split over
  `tensor` (partial sums reduced with psum). Sorting the global batch instead would make every device
  compute every token.
- `capacity`: GShard / Switch fixed-size buffers. Each sequence is one routing group with a capacity of
  C = ceil(capacity_factor * T * k / E) slots per expert; the buffers [B, E, C, D] carry the expert axis
  (logical `act_expert`), so experts shard over the `expert` mesh axis and XLA inserts the all-to-alls.
  Groups are sequences (not devices) so the result does not depend on the mesh.
  Drop priority (GShard): all first choices of the sequence in token order, then all second choices, ...;
  an assignment is dropped iff its expert's C slots are already taken. Padding takes no slot.
  A dropped assignment contributes zero (weights are not renormalised; the residual carries the token).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from ultrathink_jax.layers.linear import batched_matmul

Activation = Callable[[jax.Array], jax.Array]


def combine(expert_out: jax.Array, weight: jax.Array, dtype) -> jax.Array:
    """sum_k weight[..., k] * expert_out[..., k, :], in float32 like Mixtral (fp32 weights promote)."""
    return jnp.einsum("...kd,...k->...d", expert_out.astype(jnp.float32), weight).astype(dtype)


def dropless(x, index, weight, valid, wi_gate, wi_up, wo, act: Activation):
    del valid  # padding is computed like any token (its output is unused); nothing is ever dropped
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = _mesh_axes(mesh, "act_batch", x.shape[0])
    mlp_axes = _mesh_axes(mesh, "act_mlp", wi_gate.shape[-1])
    if not batch_axes and not mlp_axes:
        return _dropless_local(x, index, weight, wi_gate, wi_up, wo, act), jnp.zeros((), jnp.float32)

    def local(x, index, weight, wi_gate, wi_up, wo):
        y = _dropless_local(x, index, weight, wi_gate, wi_up, wo, act, out_dtype=jnp.float32)
        return (jax.lax.psum(y, mlp_axes) if mlp_axes else y).astype(x.dtype)

    tokens, mlp = P(batch_axes or None), mlp_axes or None
    y = jax.shard_map(local, mesh=mesh, out_specs=tokens,
                      in_specs=(tokens, tokens, tokens, P(None, None, mlp), P(None, None, mlp), P(None, mlp, None)),
                      )(x, index, weight, wi_gate, wi_up, wo)
    return y, jnp.zeros((), jnp.float32)


def _mesh_axes(mesh, logical: str, size: int) -> tuple[str, ...]:
    """The mesh axes (of size > 1) the active logical rules give `logical`; () without a mesh or when they do
    not divide `size` (e.g. a batch of one while tracing init: XLA then places the work itself)."""
    if mesh.empty:
        return ()
    entry = nn.logical_to_mesh_axes((logical,))[0]
    names = entry if isinstance(entry, tuple) else (entry,)
    axes = tuple(n for n in names if isinstance(n, str) and mesh.shape[n] > 1)
    return axes if size % math.prod(mesh.shape[n] for n in axes) == 0 else ()


GROUP_TILE = 64  # rows per tile of the tiled grouped matmul: each expert's group is padded to a multiple of it
# CPU: `dense` while it multiplies at most this many times the rows `tiled` does: past that the padding-free tiles
# win (measured on moe_default decoding one layer: BENCHMARKS.md)
DENSE_ROWS_RATIO = 1.5


def grouped_matmul_impl(n_assignments: int, n_experts: int, k: int) -> str:
    """How `dropless` runs the experts, by static shape (n_assignments = tokens x k). `ragged_dot` where the backend
    has a native grouped matmul (GPU, TPU). On CPU, where XLA lowers ragged_dot to a masked dense product over all
    experts, the cost is in copying and reading expert weights at small shapes and in multiplied rows at large ones:
    - `gather` up to E assignments: each assignment's [D, F] weights copied (no more copies than there are experts);
    - `dense` above E assignments while it multiplies at most DENSE_ROWS_RATIO x the rows `tiled` does: every expert
      applied to every token (E x tokens rows, each expert's weights read once, no copies), the assignments' rows
      then picked out;
    - `tiled` beyond: assignments sorted into row tiles, one weight copy per tile (>= assignments + E x tile rows).
    Why: copies grow with the assignments and dense work with E x tokens, so gather wins for few assignments and
    tiled for many; the crossovers depend on the host (measured per host in BENCHMARKS.md, "Training step: where the
    time goes", rounds 7 and 9, and the MoE section): the rule keeps the Intel AVX-512 host's."""
    if jax.default_backend() in ("gpu", "tpu"):
        return "ragged_dot"
    if n_assignments <= n_experts:
        return "gather"
    tiled_rows = n_assignments + n_experts * min(GROUP_TILE, n_assignments)
    return "dense" if n_assignments // k * n_experts <= DENSE_ROWS_RATIO * tiled_rows else "tiled"


def _dropless_local(x, index, weight, wi_gate, wi_up, wo, act: Activation, out_dtype=None, impl=None):
    b, t, d = x.shape
    k = index.shape[-1]
    n_experts = wi_gate.shape[0]
    impl = impl or grouped_matmul_impl(b * t * k, n_experts, k)
    if impl == "dense":
        out = _all_experts(x.reshape(b * t, d), index.reshape(b * t, k), wi_gate, wi_up, wo, act)
    elif impl == "gather":  # no more assignments than experts: no sort
        out = _gathered_experts(x.reshape(b * t, d), index.reshape(b * t, k), wi_gate, wi_up, wo, act)
    else:
        out = _sorted_experts(x.reshape(b * t, d), index.reshape(-1), k, wi_gate, wi_up, wo, act, impl)
    return combine(out.reshape(b, t, k, d), weight, out_dtype or x.dtype)


def _sorted_experts(x, flat_expert, k, wi_gate, wi_up, wo, act: Activation, impl: str):
    """Assignments sorted by expert, then grouped matmuls (`ragged_dot` or `tiled`). x [N, D], flat_expert [N * k]
    (assignment a = token * k + choice) -> [N * k, D] per assignment."""
    order = jnp.argsort(flat_expert, stable=True)
    group_sizes = jnp.bincount(flat_expert, length=wi_gate.shape[0]).astype(jnp.int32)
    if impl == "tiled":
        return _tiled_experts(x, order, flat_expert, group_sizes, k, wi_gate, wi_up, wo, act)
    xs = x[order // k]  # [N * k, D] sorted by expert
    h = act(jax.lax.ragged_dot(xs, wi_gate, group_sizes)) * jax.lax.ragged_dot(xs, wi_up, group_sizes)
    out_sorted = jax.lax.ragged_dot(h, wo, group_sizes)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return out_sorted[inverse]  # gather back (cheaper to differentiate than scatter-add)


def _all_experts(x, index, wi_gate, wi_up, wo, act: Activation):
    """Every expert on every token ([E, N, D]), then each assignment's row picked: E / k x the useful FLOPs, but
    each expert's weights are read once and never copied. x [N, D], index [N, k] -> [N * k, D]."""
    n, k = index.shape
    h = act(jnp.einsum("nd,edf->enf", x, wi_gate)) * jnp.einsum("nd,edf->enf", x, wi_up)
    y = jnp.einsum("enf,efd->end", h, wo)
    return y[index.reshape(-1), jnp.repeat(jnp.arange(n), k)]  # assignment a = token * k + choice


def _gathered_experts(x, index, wi_gate, wi_up, wo, act: Activation):
    """No more assignments than experts: each one's expert weights gathered ([N * k, D, F]), batched mat-vecs, no sort.
    x [N, D], index [N, k] -> [N * k, D]. One batch axis: XLA:CPU ran the [N, k]-batched form 10x slower."""
    xs = jnp.repeat(x, index.shape[-1], axis=0)  # assignment a = token * k + choice
    expert = index.reshape(-1)
    h = act(jnp.einsum("ad,adf->af", xs, wi_gate[expert])) * jnp.einsum("ad,adf->af", xs, wi_up[expert])
    return jnp.einsum("af,afd->ad", h, wo[expert])


@jax.custom_vjp
def _take_rows(src, index, inverse):
    """Row gather with a gather for a gradient. src [S, D] -> [len(index), D], row i = src[index[i]], where index S
    reads a zero row. `inverse` [S * fan] names, for each source row, the `fan` output rows that read it (index
    len(index) = none, for padding). The autodiff transpose of a gather is a scatter-add, serial on XLA:CPU."""
    return jnp.concatenate([src, jnp.zeros((1,) + src.shape[1:], src.dtype)])[index]


def _take_rows_fwd(src, index, inverse):
    return _take_rows(src, index, inverse), (index, inverse, src.shape[0])


def _take_rows_bwd(residual, cotangent):
    index, inverse, n_src = residual
    picked = _take_rows(cotangent, inverse, index)
    return picked.reshape(n_src, -1, *cotangent.shape[1:]).sum(1), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _tiled_experts(x, order, flat_expert, group_sizes, k, wi_gate, wi_up, wo, act: Activation):
    """Grouped SwiGLU as one batched matmul over row tiles. Assignments sorted by expert are laid out so that each
    expert's group starts on a tile boundary (its last tile zero-padded); each tile then multiplies by its expert's
    weights, gathered per tile (their gradient: a scatter-add of whole [D, F] windows, one per tile). Rows
    computed <= assignments + E x (GROUP_TILE - 1): no assignment is dropped and at most one partial tile per
    expert is wasted. Rows move by `_take_rows` both ways. x [N, D] tokens -> [N * k, D] per assignment."""
    n_assign, n_experts, d = flat_expert.shape[0], wi_gate.shape[0], x.shape[-1]
    tile = min(GROUP_TILE, n_assign)
    n_tiles = -(-n_assign // tile) + n_experts  # static bound: each group adds at most one partial tile
    padded = -(-group_sizes // tile) * tile
    padded_end = jnp.cumsum(padded)
    sorted_expert = flat_expert[order]
    rank = jnp.arange(n_assign, dtype=jnp.int32) - (jnp.cumsum(group_sizes) - group_sizes)[sorted_expert]
    row = (padded_end - padded)[sorted_expert] + rank  # padded row of the j-th sorted assignment
    order, row = order.astype(jnp.int32), row.astype(jnp.int32)
    row_of_assignment = jnp.zeros((n_assign,), jnp.int32).at[order].set(row)
    assignment_of_row = jnp.full((n_tiles * tile,), n_assign, jnp.int32).at[row].set(order)  # n_assign = padding
    row_token = jnp.where(assignment_of_row < n_assign, assignment_of_row // k, x.shape[0])  # N = the zero row
    tiles = _take_rows(x, row_token, row_of_assignment).reshape(n_tiles, tile, d)
    tile_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(n_tiles) * tile, side="right"),
                              n_experts - 1)  # tiles past the last group are all padding
    # batched_matmul: each tile's weight gradient (tile^T dy) as an ordinary matmul on CPU, see `untransposed`
    h = act(batched_matmul(tiles, wi_gate[tile_expert])) * batched_matmul(tiles, wi_up[tile_expert])
    out_rows = batched_matmul(h, wo[tile_expert]).reshape(n_tiles * tile, d)
    return _take_rows(out_rows, row_of_assignment, assignment_of_row)


def capacity_slots(n_tokens: int, k: int, n_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(capacity_factor * n_tokens * k / n_experts))


def assign_slots(index, valid, n_experts: int, slots: int):
    """Buffer slot of every assignment of one sequence, in choice-major (GShard) priority.

    index [T, k], valid [T] -> slot [k, T] int32 in [0, E*C] (E*C = dropped or padding), kept [k, T] bool."""
    t, k = index.shape
    expert = index.T  # [k, T]: first choices of all tokens come first
    takes_slot = jnp.broadcast_to(valid[None, :], (k, t))
    onehot = jax.nn.one_hot(expert.reshape(-1), n_experts, dtype=jnp.int32) * takes_slot.reshape(-1, 1)
    position = jnp.cumsum(onehot, axis=0) - 1  # [k*T, E]: rank of the assignment within its expert
    position = jnp.take_along_axis(position, expert.reshape(-1, 1), axis=1).reshape(k, t)
    kept = takes_slot & (position < slots)
    slot = jnp.where(kept, expert * slots + position, n_experts * slots)
    return slot.astype(jnp.int32), kept


def capacity(x, index, weight, valid, wi_gate, wi_up, wo, act: Activation, capacity_factor: float):
    b, t, d = x.shape
    k = index.shape[-1]
    n_experts = wi_gate.shape[0]
    slots = capacity_slots(t, k, n_experts, capacity_factor)
    slot, kept = jax.vmap(assign_slots, in_axes=(0, 0, None, None))(index, valid, n_experts, slots)

    def fill(x_seq, slot_seq):  # [T, D], [k, T] -> [E*C, D]; an empty slot reads the zero row T
        token = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (k, t))
        slot_token = jnp.full((n_experts * slots + 1,), t, jnp.int32).at[slot_seq.reshape(-1)].set(token.reshape(-1))
        return jnp.concatenate([x_seq, jnp.zeros((1, d), x_seq.dtype)])[slot_token[:-1]]

    def read(out_seq, slot_seq):  # [E*C, D], [k, T] -> [T, k, D]; a dropped assignment reads the zero row
        padded = jnp.concatenate([out_seq, jnp.zeros((1, d), out_seq.dtype)])
        return jnp.moveaxis(padded[slot_seq], 0, 1)

    buffers = jax.vmap(fill)(x, slot).reshape(b, n_experts, slots, d)
    buffers = nn.with_logical_constraint(buffers, ("act_batch", "act_expert", None, "act_embed"))
    h = act(jnp.einsum("becd,edf->becf", buffers, wi_gate)) * jnp.einsum("becd,edf->becf", buffers, wi_up)
    h = nn.with_logical_constraint(h, ("act_batch", "act_expert", None, "act_mlp"))
    out = jnp.einsum("becf,efd->becd", h, wo)
    out = nn.with_logical_constraint(out, ("act_batch", "act_expert", None, "act_embed"))
    gathered = jax.vmap(read)(out.reshape(b, n_experts * slots, d), slot)  # [B, T, k, D]
    dropped = jnp.sum((valid[:, None, :] & ~kept).astype(jnp.float32))
    return combine(gathered, weight, x.dtype), dropped
