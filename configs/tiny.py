"""ULTRATHINK Tiny, ~125M parameters (the original's benchmark size; GPT-2 small shape, SwiGLU)."""

from configs import base


def get_config():
    config = base.get_config()
    config.model = base.model_section(vocab_size=50257, max_seq_len=2048, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048, tie_embeddings=True)
    return config
