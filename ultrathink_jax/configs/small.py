"""ULTRATHINK Small, ~350M parameters, as a complete recipe: GPT-2 tokenizer, seq 2048, 0.5M tokens per step,
15000 steps (7.9B tokens), peak lr 3e-4."""

from ultrathink_jax.configs import base


def get_config():
    model = base.model_section(vocab_size=base.GPT2_VOCAB, max_seq_len=2048, tie_embeddings=True,
                               d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=2752,
                               dtype="bfloat16", remat_policy="dots_saveable")
    return base.pretraining_recipe(model, rows=256, grad_accum=8, steps=15_000, learning_rate=3e-4)
