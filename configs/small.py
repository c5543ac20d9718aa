"""ULTRATHINK Small, ~350M parameters."""

from configs import base


def get_config():
    config = base.get_config()
    config.model = base.model_section(vocab_size=50257, max_seq_len=2048, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=2752, tie_embeddings=True)
    return config
