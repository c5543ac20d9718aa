"""The presets: ml-collections config files, each defining get_config() (sections in base.py).

They ship inside the package, so an installed copy has them too: `get("small")`, or `--config=configs/small.py`
from any directory (ultrathink_jax.config_files resolves that path here when the working directory has no such
file).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import ml_collections

from ultrathink_jax.config import ConfigError

PRESET_DIR = Path(__file__).resolve().parent


def presets() -> list[str]:
    """Names of the packaged presets (base.py is the skeleton they share, not a recipe of its own)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.py") if p.stem not in ("__init__", "base"))


def get(name: str) -> ml_collections.ConfigDict:
    """The packaged preset `name` (e.g. "small"), freshly built."""
    if name not in presets():
        raise ConfigError(f"no packaged preset {name!r}; known: {presets()}")
    return importlib.import_module(f"{__name__}.{name}").get_config()
