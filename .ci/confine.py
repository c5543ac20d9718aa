"""An audit hook (sys.addaudithook) that refuses and records any file access under the directories named in
$ULTRATHINK_CONFINE_FORBID (os.pathsep separated): `.ci/run` runs the suite from a copy of the tree and names the
original checkout and the `shared` folder beside it, so a test that reads outside its own tree fails there.

Executed at start-up by every python of the test environments (a .pth line `.ci/run` writes into each venv's
site-packages), so subprocesses (CLI tests, the .venv-hf4 / .venv-llama checks) are covered too. Each refused
access is appended to $ULTRATHINK_CONFINE_LOG, which `.ci/run` requires to be empty after the run: a test that
catches the error still fails CI."""

import os
import sys


def _install():
    forbid = [os.path.abspath(p) for p in os.environ.get("ULTRATHINK_CONFINE_FORBID", "").split(os.pathsep) if p]
    log = os.environ.get("ULTRATHINK_CONFINE_LOG")
    if not forbid:
        return
    events = {"open", "os.listdir", "os.scandir", "os.chdir", "glob.glob"}
    busy = []

    def under(path) -> bool:
        if isinstance(path, int) or path is None:
            return False
        path = os.path.abspath(os.fsdecode(path))
        return any(path == d or path.startswith(d + os.sep) for d in forbid)

    def hook(event, args):
        if event not in events or busy or not args or not under(args[0]):
            return
        busy.append(1)
        try:
            message = f"opened outside the tree: {event} {os.fsdecode(args[0])} (pid {os.getpid()}, {sys.argv[:3]})"
            if log:
                with open(log, "a", encoding="utf-8") as f:
                    f.write(message + "\n")
        finally:
            busy.clear()
        raise PermissionError(message)

    sys.addaudithook(hook)


_install()
