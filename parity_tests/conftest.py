"""Tiny random-weight transformers reference models, saved with safe_serialization, shared across twin tests."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

# The models are tiny: intra-op threads only add contention (measured 30-70x slower with 2 threads on a
# loaded 2-core machine).
torch.set_num_threads(1)

VOCAB = 97

# name -> (config class, model class, config kwargs). Together they cover GQA, MHA, explicit head_dim,
# tied/untied heads, every activation, Mixtral sliding window, Qwen2-MoE shared experts, norm_topk_prob on/off,
# mixed dense/MoE layouts (mlp_only_layers and decoder_sparse_step), per-layer Qwen2 windows and a dense Qwen2 model.
VARIANTS = {
    "llama_gqa_head_dim": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=12, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    ),
    "llama_tied_gelu": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh"),
    ),
    "mixtral_window": (
        "MixtralConfig", "MixtralForCausalLM",
        dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
             tie_word_embeddings=False, router_aux_loss_coef=0.02),
    ),
    "qwen2_moe_shared_mixed": (
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
        dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
             shared_expert_intermediate_size=24, norm_topk_prob=False, mlp_only_layers=[1], qkv_bias=False,
             tie_word_embeddings=True, router_aux_loss_coef=0.05),
    ),
    "qwen2_moe_step_window": (
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
        dict(hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=1, num_experts=4, num_experts_per_tok=3, moe_intermediate_size=16,
             shared_expert_intermediate_size=0, norm_topk_prob=True, decoder_sparse_step=2, qkv_bias=False,
             use_sliding_window=True, sliding_window=4, max_window_layers=3, hidden_act="gelu"),
    ),
    # Dense with a per-layer sliding window: the export target for dense windowed models (llama has no window).
    "qwen2_moe_dense_window": (
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
        dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_experts=0, qkv_bias=False, use_sliding_window=True, sliding_window=3,
             layer_types=["sliding_attention", "sliding_attention"]),
    ),
}
MOE_VARIANTS = [n for n, (_, _, kw) in VARIANTS.items() if kw.get("num_experts", kw.get("num_local_experts", 0))]


def randomize_(model) -> None:
    """Replace transformers' tiny init with weights large enough that routing and logits are decisive,
    and norms that are not all ones (so a swapped or ignored norm weight shows up)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() == 0:  # zero-width shared expert (shared_expert_intermediate_size=0)
                continue
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in**0.5))


def build_reference(name: str):
    config_cls, model_cls, kwargs = VARIANTS[name]
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, **kwargs)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        # transformers builds a zero-width shared expert when shared_expert_intermediate_size=0.
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        model = getattr(transformers, model_cls)(config)
    randomize_(model)
    return model.eval()


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """reference(name) -> (transformers model, directory it was saved to with safe_serialization=True)."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            model = build_reference(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path, safe_serialization=True)
            cache[name] = (model, path)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def twin(reference):
    """twin(name) -> ultrathink_torch model loaded from the saved reference directory."""
    from ultrathink_torch import load_pretrained

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_pretrained(reference(name)[1])
        return cache[name]

    return get


def token_batch(batch: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)
