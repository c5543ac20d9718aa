"""Where a training run's wall time goes: tokenizer, data, compile (the first step), steps, eval, checkpoint,
sample. The loop wraps each phase in `phases.time(name)`; the summary is one line at the end of the run."""

from __future__ import annotations

import contextlib
import time

import jax

PHASES = ("tokenizer", "data", "compile", "steps", "eval", "checkpoint", "sample")


class Phases:
    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextlib.contextmanager
    def time(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def summary(self) -> str:
        total = sum(self.seconds.values()) or 1.0
        return "time: " + ", ".join(f"{n} {s:.1f} s ({100 * s / total:.0f}%)" for n, s in self.seconds.items())


def enable_compilation_cache(directory) -> None:
    """XLA's persistent compilation cache in `directory`: a rerun (a resume, the same config again) loads the
    compiled steps instead of compiling them. Every compile that takes over 0.5 s is cached."""
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
