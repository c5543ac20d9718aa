"""Training runs <-> Hugging Face directories: the finiteness check of a run's export (which is
`posttrain.export.export_any_run`), and an HF checkpoint turned into a run that `launch.train` resumes from
(fine-tuning).

An imported run directory is what `launch.train` would have left after step 0: the resolved config (model section
from the HF config.json, everything else from the given training config), model_config.json, the HF tokenizer,
and checkpoint 0 (the HF weights, a fresh optimizer state, the data iterator at its start). It also gets a
`config.py` that returns that config, so the fine-tuning command is
`python -m launch.train --config=RUN/config.py --workdir=RUN [--config.train.steps=N ...]`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from ultrathink_jax.hf.export import ExportError
from ultrathink_jax.hf.load import HFCheckpointNotFoundError, load_hf

# Model fields that do not change the weights or the forward maths of the model: kept from the training config.
# router_aux_loss_weight is a training choice too (the fine-tuning run's, like z-loss), but the HF config.json
# carries one (router_aux_loss_coef): when the two differ, the import says which one it keeps.
TRAINING_ONLY_FIELDS = ("dtype", "remat_policy", "scan_unroll", "attention_impl", "moe_dispatch", "capacity_factor",
                        "router_z_loss_weight", "router_aux_loss_per_layer", "router_aux_loss_weight")
log = logging.getLogger(__name__)
CONFIG_PY = '''"""Written by launch.import_hf: the resolved config of this run (config.json beside this file)."""
import json
import pathlib

import ml_collections


def get_config():
    return ml_collections.ConfigDict(json.loads((pathlib.Path(__file__).parent / "config.json").read_text()))
'''


def refuse_non_finite(params, workdir, step: int | None) -> None:
    """ExportError if `params` hold a NaN or infinity: transformers would load them silently, then emit NaNs."""
    from ultrathink_jax.checkpoint import non_finite_leaves

    bad = non_finite_leaves(params)
    if bad:
        where = f"checkpoint step {step}" if step is not None else "the newest intact checkpoint"
        raise ExportError(f"{where} of {workdir} holds non-finite values in {len(bad)} tensor(s) "
                          f"({', '.join(bad[:3])}); refusing to export it")


def import_run(hf_dir: str | os.PathLike, workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> Path:
    """Writes checkpoint 0 of a new run in `workdir` from the Hugging Face directory `hf_dir`."""
    from ultrathink_jax import sharding
    from ultrathink_jax.data import build_train_iterator, load_tokenizer
    from ultrathink_jax.data.pipeline import TOKENIZER_DIR
    from ultrathink_jax.train import run as run_lib
    from ultrathink_jax.train.config import validate
    from ultrathink_jax.train.optim import make_optimizer
    from ultrathink_jax.train.state import initial_rng, state_shardings

    hf_dir, workdir = Path(hf_dir), Path(workdir)
    model, params = load_hf(hf_dir)
    if not (hf_dir / "tokenizer.json").is_file():
        raise HFCheckpointNotFoundError(f"no tokenizer.json in {hf_dir}: the run needs the model's tokenizer")
    if run_lib.has_checkpoint(workdir):
        raise ExportError(f"workdir {workdir} already holds checkpoints; import into a new workdir")
    tokenizer = load_tokenizer(hf_dir)

    config = ml_collections.ConfigDict(config.to_dict())
    fields = dataclasses.asdict(model)
    if model.n_experts and config.model.router_aux_loss_weight != model.router_aux_loss_weight:
        log.warning("import: model.router_aux_loss_weight=%g from the training config is used, not the "
                    "router_aux_loss_coef=%g of %s; set --config.model.router_aux_loss_weight=%g to keep that one",
                    config.model.router_aux_loss_weight, model.router_aux_loss_weight, hf_dir / "config.json",
                    model.router_aux_loss_weight)
    for name in TRAINING_ONLY_FIELDS:
        fields[name] = config.model[name]
    config.model = ml_collections.ConfigDict(fields)
    validate(config)
    model = run_lib.resolve_model_config(config, tokenizer.vocab_size)

    tokenizer.save(workdir / TOKENIZER_DIR)
    data_state = build_train_iterator(config.data, tokenizer, workdir).get_state()
    mesh = run_lib.run_mesh(config)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    shardings = state_shardings(model, tx, mesh)
    with sharding.activate(mesh):
        params = jax.device_put(params, shardings.params)
        opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    # what launch.train's fresh state holds at step 0
    progress = {"step": jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
                "rng": jax.device_put(initial_rng(config.train.seed), shardings.rng)}
    run_lib.write_run_files(workdir, config, model)
    store = run_lib.checkpoints(workdir, config)
    try:
        store.save(0, params, opt_state, progress, data_state)
        store.wait()
    finally:
        store.close()
    (workdir / "config.py").write_text(CONFIG_PY)
    return workdir
