"""The original project's benchmark run: ULTRATHINK Small (~350M) with its optimisation settings.

lr 3e-4, weight decay 0.1, 2000 warmup steps then cosine, global-norm clip 1.0, 4 accumulated micro-batches,
seq 2048, vocab 50257 (GPT-2 size), RoPE theta 10000; bf16 compute on float32 params and optimizer state.
Point it at real data and the GPT-2 tokenizer, e.g.
  --config.data.train_files='corpus/*.txt' --config.data.tokenizer=../shared/data/gpt2-tokenizer
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model = base.model_section(vocab_size=50257, max_seq_len=2048, d_model=1024, n_layers=24, n_heads=16,
                                      n_kv_heads=16, d_ff=2752, tie_embeddings=True, rope_theta=10000.0,
                                      dtype="bfloat16", remat_policy="dots_saveable")
    config.data.vocab_size = 50257  # a BPE trained when no tokenizer is given stays within the model's vocab
    config.data.seq_len = 2048
    config.data.global_batch_size = 32  # 4 micro-batches of 8 rows
    config.train.steps = 100_000
    config.train.grad_accum = 4
    config.optim.learning_rate = 3e-4
    config.optim.weight_decay = 0.1
    config.optim.warmup_steps = 2000
    config.optim.schedule = "cosine"
    config.optim.grad_clip = 1.0
    config.checkpoint.every_steps = 1000
    config.eval.every_steps = 1000
    config.eval.max_batches = 50
    config.log.every_steps = 10
    return config
