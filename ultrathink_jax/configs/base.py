"""Shared skeleton of every config file: each section is owned by the component that reads it.

Sections: `model` (ultrathink_jax.config.ModelConfig), `mesh` (ultrathink_jax.sharding), `data`
(ultrathink_jax.data.default_config) and the trainer's `train`, `optim`, `checkpoint`, `eval`, `log`
(ultrathink_jax.train.config). `model.vocab_size = 0` means "the tokenizer's vocabulary, rounded up to a
multiple of 64". `pretraining_recipe` is what the size presets (tiny ... xl) share.
"""

import dataclasses

import ml_collections

from ultrathink_jax.config import ModelConfig
from ultrathink_jax.data import default_config as data_section
from ultrathink_jax.train.config import sections as train_sections


def model_section(**overrides) -> ml_collections.ConfigDict:
    fields = dataclasses.asdict(ModelConfig())
    fields.update(overrides)
    # validate the preset itself at import time (vocab_size 0 = from the tokenizer, resolved by the trainer)
    ModelConfig(**{**fields, "vocab_size": fields["vocab_size"] or 1})
    return ml_collections.ConfigDict(fields)


def mesh_section(**sizes) -> ml_collections.ConfigDict:
    # -1 = all remaining devices; the default is pure FSDP (ZeRO-3) over every device.
    mesh = {"data": 1, "fsdp": -1, "tensor": 1, "expert": 1}
    mesh.update(sizes)
    return ml_collections.ConfigDict(mesh)


def moe_variant(config: ml_collections.ConfigDict, **moe_fields) -> ml_collections.ConfigDict:
    """The same model with every MLP replaced by 8 SwiGLU experts, top-2, each half as wide as the dense MLP, so
    the active MLP compute per token equals the dense model's. `moe_fields` override (e.g. moe_first_dense)."""
    dense = config.model
    # router_aux_loss_weight 0.1 with the per-layer loss: the smallest of those measured (0.01 / 0.03 / 0.1) that
    # keeps every layer of moe_default at balance >= 0.85 after 150 steps, at +0.2% held-out loss (BENCHMARKS.md)
    config.model = model_section(**{**dense.to_dict(), "n_experts": 8, "n_experts_per_tok": 2,
                                    "moe_d_ff": dense.d_ff // 2, "router_aux_loss_weight": 0.1, **moe_fields})
    return config


GPT2_TOKENIZER = "builtin:gpt2"  # shipped in ultrathink_jax/assets: 50257 tokens, no download
GPT2_VOCAB = 50257


def pretraining_recipe(model: ml_collections.ConfigDict, *, rows: int, grad_accum: int, steps: int,
                       learning_rate: float) -> ml_collections.ConfigDict:
    """A from-scratch run of `model` on the shipped GPT-2 tokenizer at the model's full context: `rows` sequences
    per step in `grad_accum` micro-batches, AdamW (weight decay 0.1, b2 0.95, clip 1.0), linear warmup over
    optim.warmup_fraction (2%) of train.steps, then cosine to 10% of `learning_rate`. Batch and peak learning
    rate per size follow GPT-3 (Brown et al. 2020, table 2.1), steps about 20 tokens per parameter (Chinchilla).
    grad_accum is sized for about 8 accelerators; raise it on fewer. Point data.train_files at a corpus."""
    config = get_config()
    config.model = model
    config.data.tokenizer = GPT2_TOKENIZER
    config.data.vocab_size = GPT2_VOCAB  # if data.tokenizer is cleared, the BPE trained instead fits the model
    config.data.seq_len = model.max_seq_len
    config.data.global_batch_size = rows
    config.train.grad_accum = grad_accum
    config.train.steps = steps
    config.train.sample_prompt = "The "
    config.optim.learning_rate = learning_rate
    config.checkpoint.every_steps = 1000
    config.eval.every_steps = 1000
    config.eval.max_batches = 50
    return config


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"model": model_section(), "mesh": mesh_section(), "data": data_section(),
                                      **train_sections()})
