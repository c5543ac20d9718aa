"""A small model that trains meaningfully on 2 CPU cores in a few minutes (the `make train` default).

Data: the embedded corpus (the Python standard library's source), a 2048-token BPE trained on it.
"""

from ultrathink_jax.configs import base


def get_config():
    config = base.get_config()
    config.model = base.model_section(vocab_size=0, max_seq_len=256, d_model=128, n_layers=4, n_heads=4,
                                      n_kv_heads=2, d_ff=352, tie_embeddings=True)
    config.data.vocab_size = 2048
    config.data.default_corpus_max_chars = 4_000_000
    config.data.seq_len = 128
    config.data.global_batch_size = 16
    config.train.steps = 300
    config.optim.learning_rate = 2e-3
    config.optim.warmup_fraction = 0.1  # 30 of the 300 steps
    config.checkpoint.every_steps = 100
    config.eval.every_steps = 100
    config.eval.max_batches = 8
    config.log.every_steps = 10
    return config
