"""Multi-process flags shared by launch.train and launch.eval (the rest of the CLI plumbing is
ultrathink_jax.cli and ultrathink_jax.config_files)."""

from __future__ import annotations

import argparse


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """Multi-process flags (see ultrathink_jax/distributed.py); on SLURM/MPI/K8s/Cloud TPU none are needed."""
    g = parser.add_argument_group("multi-process (default: $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, "
                                  "$JAX_PROCESS_ID, or the cluster JAX detects)")
    g.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    g.add_argument("--num_processes", type=int, default=None, help="processes in the job")
    g.add_argument("--process_id", type=int, default=None, help="this process, 0 .. num_processes-1")
    g.add_argument("--heartbeat_timeout", type=int, default=30,
                   help="seconds of silence after which a peer counts as dead and the others exit")
    g.add_argument("--init_timeout", type=int, default=300, help="seconds to wait for every process to join")


def start_distributed(args: argparse.Namespace, prog: str) -> bool:
    """Joins the job's distributed runtime (before any device is touched); False for a single process."""
    from ultrathink_jax import distributed

    settings = distributed.settings_from(args.coordinator_address, args.num_processes, args.process_id,
                                         args.heartbeat_timeout, args.init_timeout)
    return distributed.initialize(settings, prog)
