"""PyTorch twin of the UltraThink-JAX model: loads the Hugging Face checkpoints it exports (llama, mixtral, qwen2_moe),
and trains them with the JAX trainer's step (`train_step`)."""

from .config import ConfigError, TwinConfig, config_from_dict, load_config
from .generate import generate
from .kv_cache import KVCache
from .load import CheckpointError, SafetensorsRequiredError, load_pretrained, to_twin_names
from .losses import causal_lm_loss, load_balancing_loss
from .model import CausalLM, CausalLMOutput
from .optim import build_adamw, decay_mask, learning_rate
from .train import StepConfig, train_step

__all__ = [
    "CausalLM",
    "CausalLMOutput",
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "SafetensorsRequiredError",
    "StepConfig",
    "TwinConfig",
    "build_adamw",
    "causal_lm_loss",
    "config_from_dict",
    "decay_mask",
    "generate",
    "learning_rate",
    "load_balancing_loss",
    "load_config",
    "load_pretrained",
    "to_twin_names",
    "train_step",
]
