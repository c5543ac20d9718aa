"""The presets: ml-collections config files, each defining get_config() (sections in base.py).

They ship inside the package, so an installed copy has them too. `load("configs/small.py")` reads a file of
that path in the working directory if there is one, else the packaged preset `small.py`; the CLIs'
`--config` goes through it.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import ml_collections

from ultrathink_jax.config import ConfigError

PRESET_DIR = Path(__file__).resolve().parent
PREFIX = "configs"  # `--config=configs/NAME.py` names a packaged preset when no such file is in the working dir


def presets() -> list[str]:
    """Names of the packaged presets (base.py is the skeleton they share, not a recipe of its own)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.py") if p.stem not in ("__init__", "base"))


def get(name: str) -> ml_collections.ConfigDict:
    """The packaged preset `name` (e.g. "small"), freshly built."""
    if name not in presets() + ["base"]:
        raise ConfigError(f"no packaged preset {name!r}; known: {presets()}")
    return importlib.import_module(f"{__name__}.{name}").get_config()


def load(path: str) -> ml_collections.ConfigDict:
    """Runs get_config() of the file `path` (the working directory first), else of the packaged preset that a
    `configs/NAME.py` path names."""
    file = Path(path)
    if file.is_file():
        return _from_file(file, path)
    if not file.is_absolute() and file.parent == Path(PREFIX) and file.suffix == ".py" \
            and (PRESET_DIR / file.name).is_file():
        return get(file.stem)
    raise ConfigError(f"config file not found: {path} (not in the working directory, nor a packaged preset "
                      f"{PREFIX}/NAME.py with NAME one of {presets()})")


def _from_file(file: Path, path: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        if e.name != "configs":
            raise
        raise ConfigError(f"config file {path} imports `configs`, which is now `ultrathink_jax.configs` "
                          "(e.g. `from ultrathink_jax.configs import base`)") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    return module.get_config()
