import os
import pathlib
import platform

import jax

from ultrathink_jax import cpu_malloc

CPUINFO = pathlib.Path("/proc/cpuinfo")


def cpu_model(cpuinfo: str) -> str:
    """'model name' and the widest x86 vector extension from /proc/cpuinfo's text, e.g. 'AMD EPYC 7B13 (AVX2)'.
    The same code measured 0.95x the compiled twin on a 2-core AVX2 host and 0.72x on an AVX-512 one (BENCHMARKS.md),
    so a number is only read beside the CPU it came from. '' when the text names no model."""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    name = fields.get("model name", "")
    return f"{name} ({isa})" if name and isa else name


def describe() -> str:
    """One line naming the machine a number came from."""
    devices = jax.devices()
    kind = devices[0].device_kind if devices else "none"
    cpu = (cpu_model(CPUINFO.read_text()) if CPUINFO.exists() else "") or platform.processor()
    return (f"{platform.machine()} {cpu} {os.cpu_count()} cores, jax {jax.__version__}, "
            f"backend {jax.default_backend()} ({len(devices)} x {kind}), CPU malloc settings "
            f"{cpu_malloc.applied}").replace("  ", " ")
