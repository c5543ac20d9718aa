"""The original project's benchmark run: ULTRATHINK Small (~350M) with its optimisation settings.

lr 3e-4, weight decay 0.1, 2000 warmup steps (2% of the 100k, so an overridden train.steps keeps the share) then
cosine, global-norm clip 1.0, 4 accumulated micro-batches of 8 rows, seq 2048, the GPT-2 tokenizer and vocabulary
(50257), RoPE theta 10000; bf16 compute on float32 params and optimizer state. Point it at real data:
  --config.data.train_files='corpus/*.txt'
"""

from ultrathink_jax.configs import small


def get_config():
    config = small.get_config()
    config.data.global_batch_size = 32
    config.train.steps = 100_000
    config.train.grad_accum = 4
    # the same as small's recipe, stated here because they are the original's numbers
    config.optim.learning_rate = 3e-4
    config.optim.warmup_fraction = 0.02  # its 2000 of 100k steps
    return config
