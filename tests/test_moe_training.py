"""A short MoE training run on the embedded corpus stays balanced: TensorBoard's router telemetry at the end
shows every expert above 1/(4E) of the routed tokens, a load-balance factor above 0.8, and every layer balanced."""

import struct
from pathlib import Path

import pytest

from ultrathink_jax.configs import base
from ultrathink_jax.train import train

E = 8


def read_scalars(logdir: Path) -> dict[tuple[int, str], float]:
    """Scalars of tensorboardX event files (TFRecord framing: length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        with open(path, "rb") as f:
            while header := f.read(12):
                (length,) = struct.unpack("<Q", header[:8])
                event = event_pb2.Event.FromString(f.read(length))
                f.read(4)
                for value in event.summary.value:
                    scalars[(event.step, value.tag)] = value.simple_value
    return scalars


def moe_config():
    config = base.get_config()
    config.model = base.model_section(vocab_size=0, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                      max_seq_len=32, tie_embeddings=True, n_experts=E, n_experts_per_tok=2,
                                      moe_d_ff=32, router_jitter=0.01,
                                      # measured on this run (pooled loss): aux weight 0 collapses to balance
                                      # 0.25 (an expert at 0.02% of the tokens); 0.05 ends at 0.87. The per-layer
                                      # default at 0.05 ends at 0.79 overall; 0.15 (3 layers) 0.88
                                      router_aux_loss_weight=0.15)
    config.data.default_corpus_max_chars = 300_000  # the embedded stdlib corpus, trimmed for speed
    config.data.vocab_size = 384
    config.data.seq_len = 32
    config.data.global_batch_size = 16
    config.data.read_threads = 1
    config.train.steps = 40
    config.train.sample_tokens = 0
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 4
    config.checkpoint.every_steps = 1000
    config.checkpoint.async_save = False
    config.eval.every_steps = 0
    config.eval.max_batches = 1
    config.log.every_steps = 10
    config.log.progress = False
    config.log.peak_tflops = 1.0  # skip the matmul peak measurement
    return config


def test_short_training_run_keeps_every_expert_busy_and_balanced(tmp_path):
    result = train(moe_config(), tmp_path)
    assert result.final_step == 40
    assert result.losses[40] < result.losses[1] - 0.5, (result.losses[1], result.losses[40])
    scalars = read_scalars(tmp_path / "tensorboard")
    shares = [scalars[(40, f"moe/expert_share/e{e}")] for e in range(E)]
    balance = scalars[(40, "moe/load_balance_factor")]
    assert min(shares) > 1 / (4 * E), shares
    assert balance > 0.8, (balance, shares)
    # The per-layer Switch loss (the default) balances each layer, not only the pool. Measured on this run with 3
    # layers: transformers' pooled loss (weight 0.05) leaves layers at 0.35 / 0.32 / 0.39 under an overall 0.79;
    # per-layer gives 0.83 / 0.72 / 0.89 at 0.05 and 0.84 / 0.86 / 0.78 at 0.15. (The 150-step moe_default goal is
    # measured in BENCHMARKS.md: 150 steps of that model are too slow for CI.)
    layers = [scalars[(40, f"moe/layer_{layer}/load_balance_factor")] for layer in (0, 1)]
    assert min(layers) > 0.6, layers
    assert all(scalars[(40, f"moe/layer_{layer}/load_entropy_bits")] > 2.8 for layer in (0, 1))
    assert scalars[(40, "moe/drop_fraction")] == 0.0  # dropless
