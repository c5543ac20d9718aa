"""KV-cached autoregressive generation: greedy or sampled, left-padded batches."""

from __future__ import annotations

import torch

from .kv_cache import KVCache
from .model import CausalLM


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p (the most likely token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: CausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return (B, T + n) token ids: the prompt followed by up to max_new_tokens new tokens.

    Prompts of different lengths are left-padded with attention_mask 0 on the padding. Rows that emitted
    eos_token_id keep emitting it; generation stops early once every row has.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    cfg = model.config
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    param = model.model.embed_tokens.weight
    cache = KVCache(cfg.num_hidden_layers, B, cfg.num_key_value_heads, T + max_new_tokens, cfg.head_dim, param.dtype, param.device)
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    tokens, step_ids = input_ids, input_ids
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits = model(step_ids, attention_mask=attention_mask, cache=cache).logits[:, -1].float()
            if do_sample:
                probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                next_ids = logits.argmax(-1)
            if eos_token_id is not None:
                next_ids = next_ids.masked_fill(finished, eos_token_id)
                finished = finished | (next_ids == eos_token_id)
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            step_ids = next_ids[:, None]
            if eos_token_id is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    return tokens
