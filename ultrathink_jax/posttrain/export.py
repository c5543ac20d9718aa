"""Export of post-training runs: a LoRA run's adapters merged into the weights (the default), or written as a PEFT
adapter directory for the base model's own export (`launch.export_hf --peft`)."""

from __future__ import annotations

import os
from pathlib import Path

from ultrathink_jax.hf.export import DTYPES, ExportError, export_params, prepare_out_dir
from ultrathink_jax.posttrain import lora as lora_lib
from ultrathink_jax.posttrain.loop import load_lora_parts, load_model, lora_config
from ultrathink_jax.train import run as run_lib


def export_any_run(workdir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None,
                   dtype: str = "float32", overwrite: bool = False, peft: bool = False) -> Path:
    """A Hugging Face directory of any run (LoRA adapters merged); with `peft`, only a LoRA run's adapters
    (adapter_config.json + adapter_model.safetensors + tokenizer), to load onto the export of its
    `posttrain.init_from` run with `peft.PeftModel.from_pretrained`."""
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:  # fail before restoring anything
        raise ExportError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
    config = run_lib.load_config(workdir)
    lora = lora_config(config)
    if not peft:
        run = load_model(workdir, step)
        return export_params(run.params, run.model_config, out, dtype, run.tokenizer, overwrite=overwrite)
    if lora is None:
        raise ExportError(f"{workdir} is not a LoRA run (posttrain.lora_rank is 0): it has no adapters to export")
    model, _, adapters, tokenizer = load_lora_parts(workdir, config, lora, step)
    base_model = run_lib.saved_model_config(config.posttrain.init_from)
    if base_model is not None and base_model.vocab_size != model.vocab_size:
        raise ExportError(f"{workdir} grew the vocabulary ({base_model.vocab_size} -> {model.vocab_size}) for its "
                          "chat tokens; a PEFT adapter cannot carry that; export merged weights instead")
    out = prepare_out_dir(out, overwrite)
    lora_lib.peft_adapter(adapters, lora, model, out, base_model=str(config.posttrain.init_from))
    tokenizer.save(out)
    return out
