"""A run directory: what `launch.train` leaves in `--workdir` so every other tool can rebuild from it alone.

    <workdir>/config.json        the resolved config (model.vocab_size filled in from the tokenizer)
    <workdir>/model_config.json  the ModelConfig the checkpoints were trained with
    <workdir>/tokenizer/         the tokenizer (Hugging Face loadable)
    <workdir>/checkpoints/<step>/{params,opt_state,progress,data}
    <workdir>/tensorboard/       event files
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
from jax.sharding import Mesh

from ultrathink_jax import atomic, sharding
from ultrathink_jax.checkpoint import CheckpointError, CheckpointNotFoundError, Checkpoints
from ultrathink_jax.config import ConfigError, ModelConfig
from ultrathink_jax.data import Tokenizer, load_tokenizer
from ultrathink_jax.data.pipeline import TOKENIZER_DIR
from ultrathink_jax.errors import one_line
from ultrathink_jax.params import abstract_params, param_shardings
from ultrathink_jax.train.config import VOCAB_MULTIPLE
from ultrathink_jax.train.state import strip_boxes

CONFIG_FILE = "config.json"
MODEL_CONFIG_FILE = "model_config.json"
CHECKPOINT_DIR = "checkpoints"
UNUSED_VOCAB_WARN = 0.01  # share of the model's vocabulary the tokenizer cannot reach above which to warn
log = logging.getLogger(__name__)


class RunNotFoundError(FileNotFoundError):
    pass


def resolve_model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """ModelConfig from `config.model`, with vocab_size 0 = the tokenizer's `vocab_size` rounded up to a
    multiple of 64; checks the vocabulary covers the tokenizer (error) and is not much larger (warning), and
    that data.seq_len fits max_seq_len."""
    fields = dict(config.model)
    padded = -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if fields.get("vocab_size") == 0:
        fields["vocab_size"] = padded
    model = ModelConfig.from_mapping(fields)
    if model.vocab_size < vocab_size:
        raise ConfigError(f"config: model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({vocab_size}); set model.vocab_size=0 to size it from the tokenizer")
    unused = model.vocab_size - vocab_size
    # Padding (to a multiple of 64, or a few spare rows as released models keep) is fine; a model far larger
    # than its tokenizer trains rows no id ever selects, usually a config that names no tokenizer of its size.
    if model.vocab_size > padded and unused > UNUSED_VOCAB_WARN * model.vocab_size:
        log.warning("config: model.vocab_size=%d but the tokenizer has %d tokens: %d embedding rows (%.0f%%) are "
                    "never used; set model.vocab_size=0 to size the model from the tokenizer, or a data.tokenizer "
                    "of that size", model.vocab_size, vocab_size, unused, 100 * unused / model.vocab_size)
    if config.data.seq_len > model.max_seq_len:
        raise ConfigError(f"config: data.seq_len={config.data.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    return model


def checkpoints(workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None,
                read_only: bool = False) -> Checkpoints:
    c = config.checkpoint if config is not None else None
    return Checkpoints(Path(workdir) / CHECKPOINT_DIR, max_to_keep=c.max_to_keep if c else 3,
                       async_save=c.async_save if c else False, read_only=read_only,
                       on_error=c.on_error if c else "stop")


def keep_workdir_tokenizer_settings(workdir: str | os.PathLike, config: ml_collections.ConfigDict
                                    ) -> ml_collections.ConfigDict:
    """A workdir that has a tokenizer keeps it (its checkpoints were trained with it), so a data.tokenizer or
    data.vocab_size that differs from the one that built it is warned about, naming both values, and replaced
    by it in the returned config (config.json then keeps describing the tokenizer actually used)."""
    if not (Path(workdir) / TOKENIZER_DIR / "tokenizer.json").is_file() or not (Path(workdir) / CONFIG_FILE).is_file():
        return config
    saved, new = load_config(workdir).data, config.data
    fields = ["tokenizer"]
    if not (new.tokenizer or saved.get("tokenizer")):  # both train a BPE: its size is the vocab_size asked for
        fields.append("vocab_size")
    differing = [f for f in fields if f in saved and saved[f] != new[f]]
    if not differing:
        return config
    kept = ml_collections.ConfigDict(config.to_dict())
    for f in differing:
        log.warning("data.%s=%r is ignored: %s already holds the tokenizer its checkpoints were trained with "
                    "(data.%s=%r); use a new --workdir to change the tokenizer", f, new[f],
                    Path(workdir) / TOKENIZER_DIR, f, saved[f])
        kept.data[f] = saved[f]
    return kept


def has_checkpoint(workdir: str | os.PathLike) -> bool:
    d = Path(workdir) / CHECKPOINT_DIR
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def saved_model_config(workdir: str | os.PathLike) -> ModelConfig | None:
    f = Path(workdir) / MODEL_CONFIG_FILE
    if not f.is_file():
        return None
    try:
        return ModelConfig.from_mapping(json.loads(f.read_text()))
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"cannot read {f}: {one_line(e)}") from e


def check_same_shapes(workdir: str | os.PathLike, model: ModelConfig) -> None:
    """Raises CheckpointError naming the differing fields if the workdir's checkpoints hold a model with other
    parameter shapes. Fields that leave every shape alone (dtype, remat_policy, ...) may change on resume."""
    saved = saved_model_config(workdir)
    if saved is None or not has_checkpoint(workdir):
        return
    saved_shapes = jax.tree.map(lambda x: x.shape, abstract_params(saved))
    if saved_shapes == jax.tree.map(lambda x: x.shape, abstract_params(model)):
        return
    diff = [f"{f.name} {getattr(saved, f.name)!r} -> {getattr(model, f.name)!r}"
            for f in dataclasses.fields(ModelConfig) if getattr(saved, f.name) != getattr(model, f.name)]
    raise CheckpointError(f"workdir {workdir} holds checkpoints of a different model shape ({', '.join(diff)}); "
                          "use a new --workdir or the original model config")


def write_run_files(workdir: str | os.PathLike, config: ml_collections.ConfigDict, model: ModelConfig) -> None:
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.model.vocab_size = model.vocab_size
    if jax.process_index() == 0:
        atomic.write_text(out / CONFIG_FILE, resolved.to_json(indent=2) + "\n")
        atomic.write_text(out / MODEL_CONFIG_FILE, json.dumps(dataclasses.asdict(model), indent=2) + "\n")


def run_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """The device mesh the config's `mesh` section describes; training, eval and generate all build theirs here."""
    return sharding.make_mesh(dict(config.mesh))


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    f = Path(workdir) / CONFIG_FILE
    if not f.is_file():
        raise RunNotFoundError(f"{workdir} is not a training run directory (no {CONFIG_FILE})")
    return ml_collections.ConfigDict(json.loads(f.read_text()))


class LoadedRun(NamedTuple):
    model_config: ModelConfig
    params: Any  # float32 pytree, sharded on the mesh
    tokenizer: Tokenizer
    config: ml_collections.ConfigDict  # the resolved training config


def load_run(workdir: str | os.PathLike, step: int | None = None, mesh: Mesh | None = None) -> LoadedRun:
    """The trained model of a run directory: params of checkpoint `step` (default: the newest intact one,
    skipping damaged ones with a warning; see `checkpoint_steps`) restored onto `mesh` (default: FSDP over all
    devices), its ModelConfig, tokenizer and resolved config."""
    return load_run_at(workdir, step, mesh)[0]


def load_run_at(workdir: str | os.PathLike, step: int | None = None, mesh: Mesh | None = None
                ) -> tuple[LoadedRun, int]:
    """`load_run` and the step it restored."""
    config = load_config(workdir)
    model = saved_model_config(workdir)
    if model is None:
        raise RunNotFoundError(f"{workdir} has no {MODEL_CONFIG_FILE}")
    tokenizer_dir = Path(workdir) / TOKENIZER_DIR
    if not tokenizer_dir.is_dir():
        raise RunNotFoundError(f"{workdir} has no {TOKENIZER_DIR}/ directory")
    tokenizer = load_tokenizer(tokenizer_dir)
    mesh = mesh or sharding.make_mesh({"fsdp": -1})
    if not has_checkpoint(workdir):
        raise CheckpointNotFoundError(f"no checkpoint in {Path(workdir) / CHECKPOINT_DIR}")
    store = checkpoints(workdir, read_only=True)
    try:
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              strip_boxes(abstract_params(model)), param_shardings(model, mesh))
        step, params = store.restore_params(step, target)
    finally:
        store.close()
    return LoadedRun(model, params, tokenizer, config), step


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps with a complete checkpoint, oldest first (empty if none)."""
    if not has_checkpoint(workdir):
        return []
    store = checkpoints(workdir, read_only=True)
    try:
        return store.all_steps()
    finally:
        store.close()
