"""Hugging Face interchange: export our params as a llama / mixtral / qwen2_moe directory and import one back.

    export_params(params, config, out_dir, dtype="float32", tokenizer=None)  -> Path     (numpy + safetensors)
    load_hf(hf_dir) -> (ModelConfig, float32 numpy params)
    family(config), to_hf_config(config, ...), from_hf_config(config_json_dict), tensor_table(config)

`mapping.py` is the single name/shape table and config translation both directions use. Bad input raises
HFFormatError / HFCheckpointNotFoundError / ExportError (ValueErrors) with one line naming the problem.
Exports load exactly in transformers 4.57.6 and 5.x; `transformers4_limitations(config)` names what 4.x cannot
load (export_params also warns it as an HFCompatibilityWarning).
"""

from ultrathink_jax.hf.export import DEFAULT_MAX_SHARD_BYTES, DTYPES, ExportError, export_params
from ultrathink_jax.hf.load import HFCheckpointNotFoundError, load_hf
from ultrathink_jax.hf.mapping import (ARCHITECTURES, FAMILIES, HFCompatibilityWarning, HFFormatError, TensorMap,
                                       family, from_hf_config, tensor_table, to_hf_config, transformers4_limitations)

__all__ = [
    "ARCHITECTURES", "DEFAULT_MAX_SHARD_BYTES", "DTYPES", "ExportError", "FAMILIES", "HFCheckpointNotFoundError",
    "HFCompatibilityWarning", "HFFormatError", "TensorMap", "export_params", "family", "from_hf_config", "load_hf",
    "tensor_table", "to_hf_config", "transformers4_limitations",
]
