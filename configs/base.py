"""Shared skeleton of every config file: each section is owned by the component that reads it."""

import dataclasses

import ml_collections

from ultrathink_jax.config import ModelConfig


def model_section(**overrides) -> ml_collections.ConfigDict:
    fields = dataclasses.asdict(ModelConfig())
    fields.update(overrides)
    ModelConfig(**fields)  # validate the preset itself at import time
    return ml_collections.ConfigDict(fields)


def mesh_section(**sizes) -> ml_collections.ConfigDict:
    # -1 = all remaining devices; the default is pure FSDP (ZeRO-3) over every device.
    mesh = {"data": 1, "fsdp": -1, "tensor": 1, "expert": 1}
    mesh.update(sizes)
    return ml_collections.ConfigDict(mesh)


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"model": model_section(), "mesh": mesh_section()})
