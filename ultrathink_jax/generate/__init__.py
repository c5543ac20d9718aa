"""Text generation with a KV cache: `generate(params, config, prompts, max_new_tokens, ...)` for token ids,
`Engine` for prefill / step / decode control (benchmarks, streaming), `sampling` for the logits processors."""

from ultrathink_jax.generate.engine import Engine, Run, generate
from ultrathink_jax.generate.sampling import GenerationError, SamplingConfig, next_token, process_logits

__all__ = ["Engine", "GenerationError", "Run", "SamplingConfig", "generate", "next_token", "process_logits"]
