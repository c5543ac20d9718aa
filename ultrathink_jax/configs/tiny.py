"""ULTRATHINK Tiny, ~125M parameters (the original's benchmark size; GPT-2 small shape, SwiGLU), as a complete
recipe: GPT-2 tokenizer, seq 2048, 256 x 2048 = 0.5M tokens per step, 5000 steps (2.6B tokens), peak lr 6e-4."""

from ultrathink_jax.configs import base


def get_config():
    model = base.model_section(vocab_size=base.GPT2_VOCAB, max_seq_len=2048, tie_embeddings=True,
                               d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048,
                               dtype="bfloat16", remat_policy="dots_saveable")
    return base.pretraining_recipe(model, rows=256, grad_accum=8, steps=5_000, learning_rate=6e-4)
