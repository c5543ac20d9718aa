# Simulated devices for sharding tests: must be set before jax is first imported anywhere.
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One XLA compilation cache for the suite (both xdist workers and the subprocesses inherit it): tests compile the
# same small programs again and again. Created once by the controller, removed when it exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ultrathink-test-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

import importlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# What some tests need beyond this venv. Missing ones FAIL (naming what and how to get it), never skip: a CI run
# without them would otherwise pass while testing less. Tests call these helpers (`from conftest import ...`).
REPO = Path(__file__).resolve().parent
TEST_DATA = REPO / "tests" / "data"  # the few real texts the tests read, shipped (licences in its README.md)


def _require(path: Path, what: str, how: str) -> Path:
    if not path.exists():
        pytest.fail(f"{what} is missing: {path} does not exist; {how}", pytrace=False)
    return path


def extra_python(venv: str, env_var: str) -> Path:
    """The python of a second environment `make test` builds (.venv-hf4, .venv-llama); $env_var overrides it."""
    path = Path(os.environ.get(env_var) or REPO / venv / "bin" / "python")
    return _require(path, f"the python of {venv}", f"`make test` builds {venv} (or set {env_var} to a python)")


def required_module(name: str):
    """A module the test extras install (`pip install -e '.[test]'`, which `make test` runs)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.fail(f"module {name} is missing ({e}); `make test` installs the test extras "
                    "(pip install -c constraints.txt -e '.[test]')", pytrace=False)
