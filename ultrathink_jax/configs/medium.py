"""ULTRATHINK Medium, ~760M parameters, as a complete recipe: GPT-2 tokenizer, seq 2048, 0.5M tokens per step,
30000 steps (15.7B tokens), peak lr 2.5e-4."""

from ultrathink_jax.configs import base


def get_config():
    model = base.model_section(vocab_size=base.GPT2_VOCAB, max_seq_len=2048, tie_embeddings=True,
                               d_model=1536, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=4096,
                               dtype="bfloat16", remat_policy="dots_saveable")
    return base.pretraining_recipe(model, rows=256, grad_accum=16, steps=30_000, learning_rate=2.5e-4)
