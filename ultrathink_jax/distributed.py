"""Multi-process runs on JAX's own distributed runtime: one process per host (or per GPU), one global mesh.

`initialize()` calls `jax.distributed.initialize` when JAX detects a cluster (SLURM, Open MPI, Kubernetes/GKE,
Cloud TPU) or when a coordinator address, process count and process id are given (arguments, else the
environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). After it, `jax.devices()` lists every
process's devices, the mesh spans them all and every jitted step is one collective program.

A dead peer must not hang the others. JAX's coordination service notices a process that stops sending heartbeats
after `heartbeat_timeout_s`; by default it then aborts every other process with a C++ stack trace. We run the
service in recoverable mode instead (a death is recorded, nothing is aborted) and a watchdog thread asks it every
second which processes are alive: when one has died it prints one line and exits, so a rerun of the same commands
resumes from the last checkpoint. Process 0 is no exception: the service runs in a process of its own
(coordination_service.py) that outlives it, so its death too is a missed heartbeat the others report. A
coordinator that never answers is one DistributedError after `init_timeout_s`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import threading
import time
import warnings

import jax

from ultrathink_jax.coordination_service import ServiceProcess, ServiceStartError

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
DEAD_PEER_EXIT_CODE = 3
_DONE_KEY = "ultrathink/finished/"
_POLL_S = 1.0


class DistributedError(ValueError):
    """Unusable distributed settings (a partial set of flags, a bad process id); one line naming them."""


@dataclasses.dataclass(frozen=True)
class Settings:
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = 30  # a peer silent this long is dead
    init_timeout_s: int = 300  # how long process 0 waits for every peer to join


def settings_from(coordinator_address: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None, heartbeat_timeout_s: int = 30, init_timeout_s: int = 300,
                  environ=None) -> Settings:
    """Explicit values win over the environment; either all three of address/count/id are set or none."""
    environ = os.environ if environ is None else environ

    def number(value, env, name):
        if value is None and environ.get(env, "") != "":
            value = environ[env]
        if value is None:
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            raise DistributedError(f"{name}={value!r} is not an integer") from None

    s = Settings(coordinator_address or environ.get(ENV_ADDRESS) or None,
                 number(num_processes, ENV_COUNT, "num_processes"), number(process_id, ENV_ID, "process_id"),
                 int(heartbeat_timeout_s), int(init_timeout_s))
    given = {"coordinator_address": s.coordinator_address, "num_processes": s.num_processes,
             "process_id": s.process_id}
    if any(v is not None for v in given.values()) and any(v is None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        raise DistributedError(f"distributed settings {given} are incomplete: also give {missing} "
                               f"(flags --{' --'.join(missing)} or {ENV_ADDRESS}/{ENV_COUNT}/{ENV_ID})")
    if s.num_processes is not None and (s.num_processes < 1 or not 0 <= s.process_id < s.num_processes):
        raise DistributedError(f"process_id={s.process_id} must be in [0, num_processes={s.num_processes})")
    if s.heartbeat_timeout_s < 2 or s.init_timeout_s < 1:
        raise DistributedError(f"heartbeat_timeout_s={s.heartbeat_timeout_s} must be >= 2 and "
                               f"init_timeout_s={s.init_timeout_s} >= 1")
    return s


def detected_cluster() -> str | None:
    """The cluster JAX would bootstrap from by itself (SLURM, Open MPI, K8s, Cloud TPU), or None."""
    from jax._src.clusters import ClusterEnv  # JAX's own detection table; there is no public accessor

    for env in ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.__name__
    return None


_watchdog: "_Watchdog | None" = None


def initialize(settings: Settings, prog: str) -> bool:
    """Joins the distributed runtime if settings or a detected cluster say so; returns whether it did.
    Must run before anything touches a device. `prog` prefixes the dead-peer line."""
    global _watchdog
    explicit = settings.num_processes is not None
    if not explicit and detected_cluster() is None:
        return False
    if explicit and settings.num_processes == 1:
        return False
    # CPU collectives across processes (no-op for GPU/TPU backends, which bring their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_recoverability", True)  # see the module docstring: we report dead peers
    try:
        with _runtime_factories():
            jax.distributed.initialize(settings.coordinator_address, settings.num_processes, settings.process_id,
                                       initialization_timeout=settings.init_timeout_s,
                                       heartbeat_timeout_seconds=settings.heartbeat_timeout_s,
                                       shutdown_timeout_seconds=max(settings.heartbeat_timeout_s, 10))
    except ServiceStartError as e:
        raise DistributedError(str(e)) from None
    _watchdog = _Watchdog(prog, settings.heartbeat_timeout_s)
    _watchdog.start()
    return True


@contextlib.contextmanager
def _runtime_factories():
    """`jax.distributed.initialize` has no argument for where the service runs, nor for what its client does
    when the coordinator is unreachable (it aborts with a C++ stack trace once `init_timeout` runs out), so the
    two factories it calls are swapped for that one call. Whichever cluster detection ran, they receive the
    addresses, process count and timeouts JAX resolved. Process 0's service runs in a process of its own; every
    client first waits (within `init_timeout`) until the coordinator's port answers, else one DistributedError."""
    from jax._src import distributed as jax_distributed

    module = getattr(jax_distributed, "_jax", None)
    if not all(hasattr(module, f) for f in ("get_distributed_runtime_service", "get_distributed_runtime_client")):
        # A JAX whose internals moved (checked: 0.10.2): plain initialize, so process 0's death aborts the others
        # with JAX's own message instead of our line; training itself is unaffected.
        warnings.warn("this JAX's distributed runtime cannot be wrapped: if process 0 dies, the others are aborted "
                      "by JAX rather than reporting it in one line", RuntimeWarning)
        yield
        return
    make_service, make_client = module.get_distributed_runtime_service, module.get_distributed_runtime_client

    def client_once_reachable(address, node_id, *args, init_timeout, **kwargs):
        waited = _wait_for_coordinator(address, init_timeout)
        return make_client(address, node_id, *args, init_timeout=max(1, int(init_timeout - waited)), **kwargs)

    module.get_distributed_runtime_service, module.get_distributed_runtime_client = (ServiceProcess,
                                                                                   client_once_reachable)
    try:
        yield
    finally:
        module.get_distributed_runtime_service, module.get_distributed_runtime_client = make_service, make_client


def _wait_for_coordinator(address: str, timeout_s: float) -> float:
    """Seconds until a TCP connection to `address` (host:port) succeeds; DistributedError after `timeout_s`."""
    host, _, port = address.rpartition(":")
    start = time.monotonic()
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return time.monotonic() - start
        except OSError as e:
            if time.monotonic() - start >= timeout_s:
                raise DistributedError(f"cannot reach the coordinator at {address} within {timeout_s}s ({e}): is "
                                       "process 0 running, and its address reachable from this host?") from None
            time.sleep(0.25)


def finish(timeout_s: float = 60.0) -> None:
    """A clean, ordered exit: marks this process as finished (so no watchdog reports it), waits for every peer,
    then disconnects; process 0, whose child process hosts the service, goes last (recoverable mode has no
    shutdown barrier of its own, and a peer still disconnecting from a vanished service is aborted by JAX)."""
    global _watchdog
    if _watchdog is None:
        return
    _watchdog.stop()
    _watchdog = None
    from jax._src import distributed as jax_distributed

    client, me, n = jax_distributed.global_state.client, jax.process_index(), jax.process_count()
    try:
        client.key_value_set(f"{_DONE_KEY}{me}", "1", allow_overwrite=True)
        client.wait_at_barrier("ultrathink/finished", int(timeout_s * 1000))
        if me == 0:
            deadline = time.monotonic() + timeout_s
            while len(client.get_live_nodes(list(range(n)))) > 1 and time.monotonic() < deadline:
                time.sleep(0.05)
    except Exception:  # a peer already gone: nothing left to coordinate
        pass
    jax.distributed.shutdown()


def wait_for_dead_peer() -> None:
    """Called with an unexpected exception in flight: a collective whose peer died fails at once (gloo sees the
    closed socket) while the service takes up to the heartbeat timeout to declare the peer dead. Gives the
    watchdog that long to exit with its one line; returns (so the caller re-raises) if every peer is alive."""
    watchdog = _watchdog
    if watchdog is not None and watchdog.is_alive():
        watchdog.join(watchdog.timeout_s + 3 * _POLL_S)


class _Watchdog(threading.Thread):
    def __init__(self, prog: str, timeout_s: int):
        super().__init__(name="ultrathink-peer-watchdog", daemon=True)
        self.prog, self.timeout_s = prog, timeout_s
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        from jax._src import distributed as jax_distributed

        client, n = jax_distributed.global_state.client, jax.process_count()
        while not self._stop_event.wait(_POLL_S):
            try:
                live = client.get_live_nodes(list(range(n)))
                if len(live) < n:  # a peer that finished on purpose has left a key first
                    done = {int(k.rsplit("/", 1)[-1]) for k, _ in client.key_value_dir_get(_DONE_KEY)}
                    dead = [p for p in range(n) if p not in live and p not in done]
                else:
                    dead = []
            except Exception:  # the service itself is gone
                if not self._stop_event.is_set():
                    self._exit("lost the coordination service (its process on process 0's host died, or the "
                               "network to it failed)")
                return
            if dead and not self._stop_event.is_set():
                self._exit(f"process(es) {dead} of {n} stopped responding (no heartbeat for "
                           f"{self.timeout_s}s)")
                return

    def _exit(self, why: str) -> None:
        print(f"{self.prog}: error: {why}; exiting (process {jax.process_index()}). Rerun the same commands "
              "to resume from the last checkpoint.", file=sys.stderr, flush=True)
        os._exit(DEAD_PEER_EXIT_CODE)
