"""`ultrathink_jax.cpu_malloc`: importing the package keeps XLA:CPU's per-call temporaries in the heap."""

import json
import os
import subprocess
import sys

import pytest

from ultrathink_jax import cpu_malloc

# A jitted call whose temporaries (a cumulative sum's 84 MB buffers) exceed a thread arena's 64 MB heap:
# page faults per call, measured in a fresh process (the settings only act before XLA's threads start).
PROBE = r"""
import json, resource, sys
import ultrathink_jax
from ultrathink_jax import cpu_malloc
import jax, jax.numpy as jnp
x = jnp.ones((330_000, 64), jnp.float32)
f = jax.jit(lambda x: jnp.cumsum(x * 2.0, axis=0)[::-1].sum(0))
assert f.lower(x).compile().memory_analysis().temp_size_in_bytes >= 330_000 * 64 * 4
f(x).block_until_ready()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": cpu_malloc.applied, "faults": min(faults)}))
"""
TEMP_PAGES = 330_000 * 64 * 4 // 4096  # 20,625


def _probe(**env):
    # one CPU device, as a single-process CPU run has (not the suite's 8 simulated ones): fewer XLA threads
    # allocating beside the probe's buffer
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
def test_temporaries_are_not_faulted_in_every_call():
    on = _probe()
    off = _probe(ULTRATHINK_CPU_MALLOC="0")
    assert on["applied"] == "applied"
    assert off["applied"] == "not applied: ULTRATHINK_CPU_MALLOC=0"
    assert off["faults"] >= TEMP_PAGES  # glibc's default: a fresh mmap per call
    assert on["faults"] < TEMP_PAGES // 10  # the fewest of 10 calls: the heap settles on reusing a buffer


@pytest.mark.parametrize("environ, reason", [
    ({"ULTRATHINK_CPU_MALLOC": "0"}, "ULTRATHINK_CPU_MALLOC=0"),
    ({"JAX_PLATFORMS": "cuda"}, "JAX_PLATFORMS=cuda"),
])
def test_skipped_where_it_does_not_belong(environ, reason):
    assert cpu_malloc._reason_to_skip(environ) == reason


def test_too_late_once_the_backend_runs():
    import jax

    jax.numpy.zeros(()).block_until_ready()  # this test process's backend is up
    assert "already initialised" in cpu_malloc._reason_to_skip({})
