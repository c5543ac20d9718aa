"""`--config=PATH`: a file in the working directory first, else the packaged preset a `configs/NAME.py` names;
and an installed copy carries the presets and the GPT-2 tokenizer but no top-level `launch` or `configs`."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ultrathink_jax import config_files, configs
from ultrathink_jax.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_configs_path_resolves_to_the_packaged_preset_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config_files.load_config_file("configs/small.py")
    assert config.model.d_model == 1024 and config.data.tokenizer == "builtin:gpt2"


def test_a_file_in_the_working_directory_wins_over_the_packaged_preset(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "small.py").write_text(
        "from ultrathink_jax.configs import small\n\n"
        "def get_config():\n    config = small.get_config()\n    config.train.steps = 7\n    return config\n")
    monkeypatch.chdir(tmp_path)
    assert config_files.load_config_file("configs/small.py").train.steps == 7
    assert configs.get("small").train.steps == 15_000


@pytest.mark.parametrize("path", ["configs/nosuch.py", "elsewhere/small.py", "/absent/configs/small.py"])
def test_a_config_path_that_is_neither_a_file_nor_a_preset_names_the_presets(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"config file not found: .* NAME one of \['benchmark', 'default'"):
        config_files.load_config_file(path)


def test_a_config_file_importing_the_old_top_level_configs_gets_one_line_naming_the_new_home(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "configs", None)  # as installed: an older development install may still map it
    old = tmp_path / "old.py"
    old.write_text("from configs import base\n\ndef get_config():\n    return base.get_config()\n")
    with pytest.raises(ConfigError, match=r"imports `configs`, which is now `ultrathink_jax.configs`"):
        config_files.load_config_file(str(old))


def test_an_installed_copy_has_the_presets_and_tokenizer_but_no_top_level_launch_or_configs(tmp_path):
    """Builds and installs a copy of the sources (as pip would from a clone) into a throwaway target, then
    imports from it outside the repository."""
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("ultrathink_jax", "ultrathink_torch", "launch"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("setup.cfg", "setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-compile", "--target", str(target), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    top_level = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info"))
    assert top_level == ["bin", "ultrathink_jax", "ultrathink_torch"], top_level  # bin/: the `ultrathink` script
    assert [p.name for p in (target / "bin").iterdir()] == ["ultrathink"]

    check = ("from ultrathink_jax import config_files, data; import ultrathink_jax; "
             "c = config_files.load_config_file('configs/small.py'); t = data.load_tokenizer(c.data.tokenizer); "
             "print(ultrathink_jax.__file__, c.model.d_model, t.vocab_size, t.encode('Hello world'))")
    env = dict(os.environ, PYTHONPATH=str(target))  # ahead of the development install in site-packages
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [str(target / "ultrathink_jax" / "__init__.py"), "1024", "50257", "[15496,",
                                  "995]"], run.stdout
