"""ULTRATHINK Large, ~1.3B parameters, as a complete recipe: GPT-2 tokenizer, seq 2048, 512 x 2048 = 1M tokens
per step, 26000 steps (27B tokens), peak lr 2e-4."""

from ultrathink_jax.configs import base


def get_config():
    model = base.model_section(vocab_size=base.GPT2_VOCAB, max_seq_len=2048, tie_embeddings=True,
                               d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=5504,
                               dtype="bfloat16", remat_policy="dots_saveable")
    return base.pretraining_recipe(model, rows=512, grad_accum=32, steps=26_000, learning_rate=2e-4)
