"""JAX's coordination service in a process of its own, so that it outlives a crash of process 0.

`jax.distributed.initialize` hosts the service inside process 0. When process 0 dies the others lose it, and
JAX's client aborts them at once with a C++ stack trace ("Terminating process because the JAX distributed
service detected fatal errors"); the client's `missed_heartbeat_callback` cannot replace that from Python in
jaxlib 0.10.2 (calling it fails to convert its absl::Status: std::bad_cast, then std::terminate). Served from
here instead, the service sees process 0 stop sending heartbeats like any other process, and every survivor's
watchdog (distributed.py) prints its one line naming process 0.

`ServiceProcess` is what JAX keeps as its service object (`shutdown()` stops this process). The process talks
to its parent over pipes: it prints "ready" once the port is bound (or one error line and exits 1), stops on a
"stop" line, and when its input ends without one (the parent died) it keeps serving until no process is
connected any more, at most `heartbeat_timeout + LINGER_S` seconds, so that the survivors see the death. It
ignores SIGINT/SIGTERM: a preempted run still needs it to agree on and save its last step.

    python coordination_service.py BIND_ADDRESS NUM_PROCESSES HEARTBEAT_TIMEOUT_S SHUTDOWN_TIMEOUT_S
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

LINGER_S = 30  # beyond the heartbeat timeout: survivors notice the death within it plus one watchdog poll
_START_TIMEOUT_S = 60
_ESTABLISHED = "01"  # TCP state in /proc/net/tcp


class ServiceStartError(RuntimeError):
    """The service process could not bind its address (or did not answer)."""


class ServiceProcess:
    """Starts the service process and waits until it serves; `shutdown()` is JAX's call at the end of a run."""

    def __init__(self, address: str, num_nodes: int, heartbeat_timeout: int, shutdown_timeout: int,
                 recoverable: bool):
        if not recoverable:  # the watchdog needs a death recorded, not propagated as an abort
            raise ValueError("the coordination service process runs in recoverable mode only")
        # -I: no script directory on sys.path (this package's module names must not shadow any others)
        argv = [address, str(num_nodes), str(heartbeat_timeout), str(shutdown_timeout)]
        self._proc = subprocess.Popen([sys.executable, "-I", __file__, *argv], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, start_new_session=True)
        ready = _readline(self._proc, _START_TIMEOUT_S)
        if ready != "ready":
            self._proc.kill()
            self._proc.wait()
            raise ServiceStartError(f"the coordination service on {address} did not start: "
                                    f"{ready or f'no answer in {_START_TIMEOUT_S}s'}")

    def shutdown(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.write("stop\n")
            self._proc.stdin.close()
            self._proc.wait()


def _readline(proc: subprocess.Popen, timeout_s: float) -> str:
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline().strip()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return line[0] if line else ""


def connected_clients(port: int) -> int | None:
    """Established TCP connections to `port` on this host (Linux /proc), or None where that cannot be read."""
    count = 0
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for row in f.readlines()[1:]:
                    local, _, state = row.split()[1:4]
                    count += int(local.rsplit(":", 1)[1], 16) == port and state == _ESTABLISHED
    except OSError:
        return None
    return count


def serve(address: str, num_nodes: int, heartbeat_timeout: int, shutdown_timeout: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from jaxlib import _jax  # the runtime only: importing jax itself would cost seconds

    try:
        service = _jax.get_distributed_runtime_service(address, num_nodes, heartbeat_timeout=heartbeat_timeout,
                                                       shutdown_timeout=shutdown_timeout, recoverable=True)
    except Exception as e:  # e.g. the port is taken
        print(" ".join(str(e).split()), flush=True)
        return 1
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "stop":  # the parent is gone: serve the survivors until they leave
        port = int(address.rsplit(":", 1)[1])
        deadline = time.monotonic() + heartbeat_timeout + LINGER_S
        while time.monotonic() < deadline and connected_clients(port) != 0:
            time.sleep(0.5)
    service.shutdown()
    return 0


if __name__ == "__main__":
    bind, nodes, heartbeat, shutdown = sys.argv[1:]
    sys.exit(serve(bind, int(nodes), int(heartbeat), int(shutdown)))
