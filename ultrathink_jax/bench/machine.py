import os
import platform

import jax

from ultrathink_jax import cpu_malloc


def describe() -> str:
    """One line naming the machine a number came from."""
    devices = jax.devices()
    kind = devices[0].device_kind if devices else "none"
    return (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, jax {jax.__version__}, "
            f"backend {jax.default_backend()} ({len(devices)} x {kind}), CPU malloc settings "
            f"{cpu_malloc.applied}").replace("  ", " ")
