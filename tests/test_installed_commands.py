"""`pip install .` gives the `ultrathink` command, which runs outside a checkout with the packaged presets; in a
checkout `launch.X` is the same module as the installed command's.

The install goes into a throwaway venv outside the tree that reuses this environment's dependencies (a .pth naming
its site-packages, whose own .pth files, this checkout's editable install among them, are not processed there) and
gets the repository itself with `pip install --no-deps`: a wheel build, no download."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("installed")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "reuse_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    source = root / "src"  # a copy, as a clone would be: the build leaves its build/ and egg-info there
    for name in ("ultrathink_jax", "ultrathink_torch", "launch"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("setup.cfg", "setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", str(source)], check=True, capture_output=True, env=env, cwd=root, timeout=600)
    work = root / "cwd"  # not the checkout: nothing of the tree is importable from here
    work.mkdir()
    return env_dir / "bin", env, work


def run(installed, *argv, timeout=300):
    bin_dir, env, work = installed
    return subprocess.run([str(bin_dir / argv[0]), *argv[1:]], capture_output=True, text=True, env=env, cwd=work,
                          timeout=timeout)


def test_the_installed_package_is_not_the_checkout(installed):
    where = run(installed, "python", "-c", "import ultrathink_jax, ultrathink_jax.commands as c; print(c.__file__)")
    assert where.returncode == 0, where.stderr
    assert "site-packages" in where.stdout and str(REPO) not in where.stdout, where.stdout
    assert run(installed, "python", "-c", "import launch").returncode != 0, "launch/ must not be installed"


def test_ultrathink_trains_the_packaged_default_preset_from_any_directory(installed):
    # `make train`'s preset (configs/default.py, packaged) on a slice of its embedded corpus, for 2 steps
    out = run(installed, "ultrathink", "train", "--config=configs/default.py", "--config.train.steps=2",
              "--config.data.default_corpus_max_chars=200000", "--config.data.vocab_size=512",
              "--config.checkpoint.every_steps=2", "--config.eval.every_steps=0", "--config.log.progress=false",
              "--workdir=run", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (installed[2] / "run" / "checkpoints" / "2").is_dir(), sorted(p.name for p in (installed[2] / "run").iterdir())


@pytest.mark.parametrize("command", ["train", "eval", "generate", "tokenize", "export-hf", "export-gguf", "import-hf",
                                     "sft", "dpo", "constitutional", "bench"])
def test_every_command_is_installed(installed, command):
    out = run(installed, "ultrathink", command, "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: launch."), (out.stdout[:200], out.stderr[-500:])


def test_unknown_command_is_one_line_and_exit_2(installed):
    out = run(installed, "ultrathink", "trian")
    assert out.returncode == 2 and out.stderr.splitlines()[-1] == "ultrathink: error: unknown command 'trian'"


def test_launch_names_are_the_installed_commands_modules():
    import launch.generate
    import launch.train
    from ultrathink_jax import commands

    assert launch.train is commands.train and launch.generate is commands.generate
    assert launch.train.main.__module__ == "ultrathink_jax.commands.train"


def test_python_m_launch_runs_the_command_file_as_main():
    import importlib.util

    import launch.export_hf  # noqa: F401  imported through launch/ first, as other tests in a worker may have done
    # runpy (`python -m launch.X`) makes the spec's origin sys.argv[0] and __file__, and runs the loader's code
    spec = importlib.util.find_spec("launch.export_hf")
    assert spec.origin == importlib.util.find_spec("ultrathink_jax.commands.export_hf").origin
    assert spec.loader.get_code("launch.export_hf").co_filename == spec.origin
    out = subprocess.run([sys.executable, "-m", "launch.export_hf", "--workdir=absent", "--out=x"], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2 and out.stderr.strip().endswith("absent is not a training run directory (no config.json)")
