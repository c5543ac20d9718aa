"""Which rows of each global batch this process reads."""

from __future__ import annotations

from ultrathink_jax.data.errors import DataError


def process_slice(global_batch_size: int, process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(first row, rows) of this process's share of each global batch, for indexed and streaming iterators."""
    if process_index is None or process_count is None:
        import jax  # only asked when the caller did not say; tests pass both explicitly

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise DataError(f"data config: global_batch_size={global_batch_size} must be divisible by the "
                        f"process count {process_count}")
    local = global_batch_size // process_count
    return process_index * local, local
