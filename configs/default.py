"""A small model that trains meaningfully on 2 CPU cores in a few minutes (the `make train` default)."""

from configs import base


def get_config():
    config = base.get_config()
    config.model = base.model_section(vocab_size=4096, max_seq_len=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=704, tie_embeddings=True)
    return config
