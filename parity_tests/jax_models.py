"""Tiny JAX models for the JAX-vs-twin-vs-transformers parity tests, with random and trained weights.

Each model is exported to a Hugging Face directory (fp32) with `ultrathink_jax.hf`, which the twin and
transformers then load: so every parity test also checks the export. Tokens are bytes (vocab 256) of real text:
Python standard-library sources, the project's embedded corpus. Everything is cached for the whole session.
"""

from __future__ import annotations

import functools
import sysconfig
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import linen as nn

from ultrathink_jax import sharding
from ultrathink_jax.config import ModelConfig
from ultrathink_jax.data.packing import pack_documents, pack_row, stack_rows
from ultrathink_jax.hf import export_params, tensor_table
from ultrathink_jax.losses import cross_entropy
from ultrathink_jax.layers.attention import attention_mask
from ultrathink_jax.layers.rotary import rope_tables
from ultrathink_jax.model import Block, Transformer, layer_plan
from ultrathink_jax.moe import moe_loss
from ultrathink_jax.params import abstract_params
from ultrathink_jax.tree import leaf_at

VOCAB = 256
EOS = 0  # packed documents' end-of-text id
_BASE = dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=128, init_std=0.1,
             router_aux_loss_weight=0.02, router_z_loss_weight=0.0,  # z-loss has no transformers counterpart
             router_aux_loss_per_layer=False)  # transformers' pooled aux loss, so losses compare exactly
MODELS = {
    # llama: GQA, explicit head_dim, untied head
    "dense": dict(_BASE, n_layers=2, head_dim=12, d_ff=64, rope_theta=500.0),
    # mixtral: MoE in every layer, renormalised top-2, sliding window
    "mixtral": dict(_BASE, n_layers=2, d_ff=48, n_experts=4, n_experts_per_tok=2, sliding_window=6),
    # qwen2_moe: a leading dense layer, shared expert, un-normalised top-k, tied embeddings, tanh-GELU
    "qwen2_moe": dict(_BASE, n_layers=3, d_ff=48, n_experts=4, n_experts_per_tok=2, moe_d_ff=16, moe_first_dense=1,
                      shared_expert_d_ff=24, norm_topk_prob=False, tie_embeddings=True,
                      activation="gelu_pytorch_tanh"),
}
FAMILY = {"dense": "llama", "mixtral": "mixtral", "qwen2_moe": "qwen2_moe"}
WEIGHTS = ("random", "trained")
TRAIN_STEPS = 150
SEQ = 48


def config(name: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**MODELS[name], **overrides})


def one_device_mesh():
    return sharding.make_mesh({}, jax.devices()[:1])


# ------------------------------------------------------------------------------------------------- text

_TRAIN_FILES = ("argparse.py", "textwrap.py", "shlex.py")
_HELD_OUT_FILES = ("difflib.py",)


@functools.lru_cache(maxsize=None)
def _text_bytes(files: tuple[str, ...]) -> np.ndarray:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((stdlib / f).read_bytes() for f in files)
    return np.frombuffer(data, np.uint8).astype(np.int32)


def text_batch(batch: int, length: int = SEQ, seed: int = 0, held_out: bool = True) -> np.ndarray:
    """Windows of real text (bytes), from held-out files unless `held_out=False`."""
    data = _text_bytes(_HELD_OUT_FILES if held_out else _TRAIN_FILES)
    starts = np.random.default_rng(seed).integers(0, len(data) - length, batch)
    return np.stack([data[s:s + length] for s in starts])


def packed_rows(n_rows: int, length: int = SEQ, seed: int = 0, random_ids: bool = False) -> list[dict]:
    """`n_rows` consecutive rows of documents (2-24 tokens + EOS each) packed by the data pipeline's own packer, so
    each row holds several documents with their segment ids, restarting positions and boundary weights. Documents
    are consecutive pieces of the training text, or random ids; id 0 (never in Python sources) is the EOS."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 25, 3 * n_rows * length // 13 + 8)
    if random_ids:
        docs = [rng.integers(1, VOCAB, n) for n in lengths]
    else:
        ends = np.cumsum(lengths)
        docs = np.split(_text_bytes(_TRAIN_FILES)[:ends[-1]], ends[:-1])
    stream = pack_documents(docs, EOS, VOCAB)
    return [pack_row(stream, r, length, EOS) for r in range(n_rows)]


def packed_batch(rows: int, length: int = SEQ, seed: int = 0, random_ids: bool = False) -> dict[str, np.ndarray]:
    return stack_rows(packed_rows(rows, length, seed, random_ids))


def random_batch(batch: int, length: int = SEQ, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length), dtype=np.int32)


def batches():
    """(label, tokens) pairs every forward parity test runs on: real text and random ids."""
    return [("text", text_batch(2)), ("random_ids", random_batch(2))]


# ------------------------------------------------------------------------------------------------- JAX side

def inputs(tokens):
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return tokens, positions, jnp.ones_like(tokens)


@functools.lru_cache(maxsize=None)
def _forward(cfg: ModelConfig):
    return jax.jit(lambda params, tokens: Transformer(cfg).apply({"params": params}, *inputs(tokens))[:2])


@functools.lru_cache(maxsize=None)
def _router_logits(cfg: ModelConfig):
    """The model's own Block modules applied layer by layer (the scanned model keeps no intermediates), capturing
    each MoE router's logits."""
    def run(params, tokens):
        tokens, positions, segment_ids = inputs(tokens)
        x = jnp.take(params["embed_tokens"]["embedding"], tokens, axis=0)
        cos, sin = rope_tables(positions, cfg.resolved_head_dim, cfg.rope_theta)
        index = jnp.arange(tokens.shape[1])
        mask = attention_mask(index, index, segment_ids, segment_ids, cfg.sliding_window)
        routers = []
        for stage in layer_plan(cfg):
            for unit in range(stage.n_units):
                for b, is_moe in enumerate(stage.unit):
                    block = jax.tree.map(lambda a: a[unit], params[stage.name][f"block_{b}"])
                    (x, _, _), state = Block(cfg, is_moe, True).apply(
                        {"params": block}, x, cos, sin, mask, segment_ids > 0, mutable=["intermediates"],
                        capture_intermediates=lambda mdl, method: mdl.name == "router" and method == "__call__")
                    if is_moe:
                        routers.append(state["intermediates"]["moe"]["router"]["__call__"][0])
        return routers
    return jax.jit(run)


def forward(cfg: ModelConfig, params, tokens):
    """(logits [B, T, V], aux, router logits per MoE layer in layer order, each [B*T, E]) as numpy."""
    logits, aux = _forward(cfg)(params, tokens)
    routers = _router_logits(cfg)(params, tokens) if cfg.n_experts else []
    return np.array(logits), aux, [np.array(r).reshape(-1, r.shape[-1]) for r in routers]


def lm_loss(cfg: ModelConfig, params, tokens):
    """Mean next-token cross-entropy + the MoE auxiliary loss the trainer adds (what the twin's loss computes)."""
    logits, aux, _ = Transformer(cfg).apply({"params": params}, *inputs(tokens))
    weights = jnp.ones(tokens[:, 1:].shape, jnp.float32)
    total, count = cross_entropy(logits[:, :-1], jnp.asarray(tokens)[:, 1:], weights)
    loss = total / count
    return loss + moe_loss(aux["moe"], cfg) if "moe" in aux else loss


@functools.lru_cache(maxsize=None)
def loss_and_grad(cfg: ModelConfig):
    """jitted (params, tokens) -> (lm_loss, gradient tree)."""
    return jax.jit(jax.value_and_grad(lambda p, t: lm_loss(cfg, p, t)))


@functools.lru_cache(maxsize=None)
def params(name: str, weights: str):
    """float32 params: `random` (normal, std init_std, norm scales 1 + 0.2 N(0, 1) so a swapped or ignored norm
    shows) or `trained` (AdamW on real text from there). Drawn in numpy: compiling the sharded init costs more."""
    cfg = config(name)
    rng = np.random.default_rng(1)

    def draw(path, x):
        if path[-1].key == "scale":
            return jnp.asarray(1.0 + 0.2 * rng.standard_normal(x.shape), jnp.float32)
        return jnp.asarray(cfg.init_std * rng.standard_normal(x.shape), jnp.float32)

    p = jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract_params(cfg)))
    if weights == "random":
        return p
    tx = optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.01)
    grad_fn = loss_and_grad(cfg)
    update = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
    state = tx.init(p)
    for step in range(TRAIN_STEPS):
        _, g = grad_fn(p, text_batch(8, 64, seed=1000 + step, held_out=False))
        p, state = update(p, state, g)
    return p


@functools.lru_cache(maxsize=None)
def export_dir(name: str, weights: str) -> Path:
    out = Path(tempfile.mkdtemp(prefix=f"ultrathink_{name}_{weights}_"))
    return export_params(params(name, weights), config(name), out, overwrite=True)


# ------------------------------------------------------------------------------------------------- torch side

@functools.lru_cache(maxsize=None)
def twin(name: str, weights: str):
    from ultrathink_torch import load_pretrained

    return load_pretrained(export_dir(name, weights))


@functools.lru_cache(maxsize=None)
def hf(name: str, weights: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(export_dir(name, weights)).eval()


def torch_ids(tokens) -> torch.Tensor:
    return torch.as_tensor(np.asarray(tokens), dtype=torch.long)


def jax_tree_to_twin(cfg: ModelConfig, tree) -> dict[str, torch.Tensor]:
    """A params-shaped tree (e.g. gradients) under the twin's parameter names, via the export table."""
    from ultrathink_jax.hf.export import hf_tensor
    from ultrathink_torch import config_from_dict, to_twin_names

    from ultrathink_jax.hf import to_hf_config

    named = {}
    for entry in tensor_table(cfg):
        if entry.layout != "zeros":
            shape = np.shape(leaf_at(tree, entry.jax_path))[len(entry.index):]
            named[entry.hf_name] = torch.from_numpy(hf_tensor(tree, entry, lambda e: shape).copy())
    return to_twin_names(named, config_from_dict(to_hf_config(cfg)))


def safetensors_contents(directory: Path) -> dict[str, tuple]:
    """Every tensor of a Hugging Face directory as (dtype, shape, raw bytes), for byte-identity checks."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="np") as st:
            for name in st.keys():
                t = st.get_tensor(name)
                out[name] = (t.dtype.str, t.shape, t.tobytes())
    return out
