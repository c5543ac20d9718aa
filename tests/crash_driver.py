"""Runs `launch.train` with a fault at a chosen moment, for tests/test_crash_resume.py (not a test itself):

    python tests/crash_driver.py MOMENT N -- [launch.train arguments]

MOMENT: `kill-mid-step` (SIGKILL right after this process dispatches its N-th step, once earlier saves are on
disk), `kill-mid-save` (SIGKILL while step N's async checkpoint is written: files in place, not yet renamed),
`kill-after-save` (SIGKILL right after step N's checkpoint is committed), `term-at-step` (SIGTERM after the N-th
step, and a second SIGTERM while that checkpoint is being written).
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orbax.checkpoint._src.path import atomicity  # noqa: E402

from launch import train as train_cli  # noqa: E402
from ultrathink_jax import checkpoint as checkpoint_lib  # noqa: E402
from ultrathink_jax.train import loop  # noqa: E402


def kill(sig=signal.SIGKILL):
    sys.stderr.flush()
    os.kill(os.getpid(), sig)


def main() -> int:
    moment, n, sep, *argv = sys.argv[1:]
    n = int(n)
    assert sep == "--", sys.argv
    stores = []
    real_init = checkpoint_lib.Checkpoints.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        stores.append(self)

    checkpoint_lib.Checkpoints.__init__ = init

    if moment in ("kill-mid-step", "term-at-step"):
        real_functions, calls = loop.step_functions, []

        def step_functions(*args):
            fns = real_functions(*args)

            def train_step(state, batch):
                out = fns.train_step(state, batch)  # dispatched: the step now runs on the devices
                calls.append(1)
                if len(calls) == n:
                    if moment == "kill-mid-step":
                        stores[-1]._manager.wait_until_finished()
                        kill()
                    kill(signal.SIGTERM)
                return out

            return fns._replace(train_step=train_step)

        loop.step_functions = step_functions

    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        mine = self.get_final().name == str(n)
        if mine and moment == "kill-mid-save":
            kill()
        if moment == "term-at-step":
            kill(signal.SIGTERM)  # the second signal, while the checkpoint is being written
        await real_finalize(self, *args, **kwargs)
        if mine and moment == "kill-after-save":
            kill()

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    return train_cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
