"""Stopping cleanly when the scheduler asks: SIGTERM (spot instances, SLURM, Kubernetes) or SIGINT (Ctrl-C).

While training runs, either signal only raises a flag. The loop polls it between steps, so the step in flight
finishes; it then checkpoints the last completed step (after any async save in flight), and raises `Preempted`,
which `launch.train` turns into one line and exit status 143 so that schedulers requeue the job. A second signal
while the checkpoint is being written is reported and otherwise ignored: the save finishes (SIGKILL still ends the
process at once, and orbax's write-then-rename leaves the previous checkpoint intact).

With several processes the signal may reach only some of them, at different steps, but every process must save
the same step collectively. So processes agree on stopping only at the steps they all poll at (the metric fetch
steps, `log.every_steps`), with one tiny all-gather of the flags there; one process stops after a signal reaches
it. (jax's `multihost_utils.reached_preemption_sync_point` does the same over the coordination service, but only
for SIGTERM and only after `jax.distributed.initialize` with its own C++ signal handler.)
"""

from __future__ import annotations

import signal
import sys
import threading

import jax
import numpy as np

EXIT_STATUS = 143  # 128 + SIGTERM: what schedulers expect from a job that stopped because they asked
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after checkpointing; the message names the step and the checkpoint."""


class StopSignals:
    """Context manager installing the flag-raising handlers (main thread only), restoring the old ones on exit."""

    def __init__(self, stream=None):
        self.received: int | None = None  # the first signal's number
        self._stream = stream or sys.stderr
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():  # None: a handler not set from Python (e.g. jax's C++ one)
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            print(f"received {signal.Signals(signum).name}: stopping after the current step and checkpointing",
                  file=self._stream, flush=True)
        else:
            print(f"received {signal.Signals(signum).name} again: still writing the checkpoint (SIGKILL abandons "
                  "it; the previous checkpoint stays intact)", file=self._stream, flush=True)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def should_stop(self, sync_point: bool) -> bool:
        """True once a signal arrived here (one process) or, with several processes, at a `sync_point` step
        (the same steps on every process) when it arrived at any of them."""
        if jax.process_count() == 1:
            return self.received is not None
        if not sync_point:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.received or 0))
        if self.received is None and np.any(flags):
            self.received = int(np.max(flags))
        return bool(np.any(flags))
