"""ULTRATHINK XL, ~2.7B parameters."""

from configs import base


def get_config():
    config = base.get_config()
    config.model = base.model_section(vocab_size=50257, max_seq_len=2048, d_model=2560, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=6912, tie_embeddings=True)
    return config
