"""glibc malloc settings for the XLA CPU backend, applied when `ultrathink_jax` is imported.

XLA:CPU allocates each executable's temporaries as one buffer per call (135 MB for the default train step) with
posix_memalign, from the calling worker thread's malloc arena. glibc serves a thread arena's allocations above its
64 MB heap size with a fresh mmap and unmaps them on free, so every step page-faulted all of its temporaries in
again: 33,000 faults and ~90 ms of kernel time per default step on a 2-core machine (BENCHMARKS.md). One arena
without mmap, and a high trim threshold, keep the freed buffer in the heap for the next step. Arena assignment is
fixed when a thread first allocates, so this only takes effect before XLA's CPU threads start, i.e. before jax's
backend is initialised; later it changes nothing and says so. The cost is memory: the process keeps what it
freed (up to 2 GiB), and the heap grows by a few temp buffers before the calls settle on reusing one (TOP_PAD).

Applied only where XLA will run on the CPU (JAX_PLATFORMS unset or cpu and no accelerator plugin installed), on
glibc. ULTRATHINK_CPU_MALLOC=0 leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

ENV = "ULTRATHINK_CPU_MALLOC"
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes an int: return memory to the OS only above 2 GiB of free heap top
# Heap growth in steps this much larger than asked: posix_memalign's alignment slack means a freed temp buffer is
# not always large enough for the next call's, so the heap grows by a few buffers before every call reuses one
# (a 175 MB buffer: resident memory 0.5 -> 0.7-1.4 GB over 10 calls with this, up to 1.9 GB without).
TOP_PAD = 256 * 2 ** 20
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")

applied: str = "not yet"  # why the settings were or were not applied (the bench reports it)


def _reason_to_skip(environ) -> str | None:
    if environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and platforms.split(",")[0].strip() != "cpu":
        return f"JAX_PLATFORMS={platforms}"
    if not platforms:
        plugin = next((p for p in ACCELERATOR_PLUGINS if importlib.util.find_spec(p) is not None), None)
        if plugin:
            return f"accelerator plugin {plugin} installed"
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return "jax's backend was already initialised (its threads keep their arenas)"
    return None


def configure(environ=None) -> bool:
    """Applies the settings if this process will run XLA on the CPU and they can still take effect; returns
    whether they were applied (the reason is in `applied`)."""
    global applied
    if applied == "applied":
        return True
    reason = _reason_to_skip(os.environ if environ is None else environ)
    if reason is None:
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError off glibc (musl, ...)
        except (OSError, AttributeError):
            reason = "not glibc"
    if reason is None:
        ok = all(libc.mallopt(p, v) == 1 for p, v in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0),
                                                      (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
        reason = None if ok else "mallopt refused"
    applied = "applied" if reason is None else f"not applied: {reason}"
    return reason is None
