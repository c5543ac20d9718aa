"""ULTRATHINK XL, ~2.7B parameters, as a complete recipe: GPT-2 tokenizer, seq 2048, 1M tokens per step,
54000 steps (57B tokens), peak lr 1.6e-4."""

from ultrathink_jax.configs import base


def get_config():
    model = base.model_section(vocab_size=base.GPT2_VOCAB, max_seq_len=2048, tie_embeddings=True,
                               d_model=2560, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=6912,
                               dtype="bfloat16", remat_policy="dots_saveable")
    return base.pretraining_recipe(model, rows=512, grad_accum=32, steps=54_000, learning_rate=1.6e-4)
