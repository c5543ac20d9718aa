"""losses.head_cross_entropy (the training loss's fused, chunked head) against the model's logits + cross_entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ultrathink_jax import losses
from ultrathink_jax.config import ConfigError, ModelConfig
from ultrathink_jax.configs import default
from ultrathink_jax.model import Transformer
from ultrathink_jax.train import steps
from ultrathink_jax.train.config import validate

B, T, V = 4, 32, 256


def _model(tie: bool, dtype="float32"):
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64,
                      tie_embeddings=tie, dtype=dtype)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((B, T), np.int32),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
             "weights": (rng.random((B, T)) > 0.25).astype(np.float32)}  # some targets weigh nothing
    params = nn.unbox(Transformer(cfg).init(jax.random.key(0), batch["inputs"], batch["positions"],
                                            batch["segment_ids"])["params"])
    return cfg, params, batch


def _reference(cfg, z, params, batch):
    """The unfused loss: the model's [B, T, V] logits, then cross_entropy and PaLM's z-loss (log Z squared)."""
    logits, _, _ = Transformer(cfg).apply({"params": params}, batch["inputs"], batch["positions"],
                                          batch["segment_ids"])
    ce, _ = losses.cross_entropy(logits, batch["targets"], batch["weights"])
    z_sum = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * batch["weights"])
    return ce + z * z_sum, ce


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("z, chunk_mib", [(0.0, 0.01), (1e-2, 0.05), (1e-2, 1e6)])  # chunks of 2, 8, 32 positions
def test_value_and_gradient_equal_the_unfused_loss(tie, z, chunk_mib):
    cfg, params, batch = _model(tie)
    (want, want_ce), want_grad = jax.jit(jax.value_and_grad(lambda p: _reference(cfg, z, p, batch), has_aux=True))(params)
    loss = lambda p: steps.micro_batch_loss(cfg, z, p, batch, jax.random.key(1), logits_chunk_mib=chunk_mib)
    (got, parts), got_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(parts["ce_sum"], want_ce, rtol=1e-6)
    assert parts["weight_sum"] == batch["weights"].sum()
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(g, w, atol=2e-6 * float(jnp.max(jnp.abs(w))), rtol=1e-4)


@pytest.mark.parametrize("pad_target", [-1, V])
def test_a_weightless_target_outside_the_vocabulary_adds_nothing(pad_target):
    cfg, params, batch = _model(True)
    padded = {**batch, "targets": np.where(batch["weights"] > 0, batch["targets"], pad_target).astype(np.int32)}
    loss = jax.jit(lambda p, b: steps.micro_batch_loss(cfg, 1e-2, p, b, jax.random.key(1), logits_chunk_mib=0.01))
    (got, got_parts), (want, want_parts) = loss(params, padded), loss(params, batch)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_parts["ce_sum"], want_parts["ce_sum"], rtol=1e-6)


def test_bfloat16_matches_the_unfused_loss_to_bf16_precision():
    cfg, params, batch = _model(True, "bfloat16")
    (want, _), want_grad = jax.jit(jax.value_and_grad(lambda p: _reference(cfg, 0.0, p, batch), has_aux=True))(params)
    (got, _), got_grad = jax.jit(jax.value_and_grad(
        lambda p: steps.micro_batch_loss(cfg, 0.0, p, batch, jax.random.key(1), logits_chunk_mib=0.01),
        has_aux=True))(params)
    np.testing.assert_allclose(got, want, rtol=2e-3)
    g, w = got_grad["embed_tokens"]["embedding"], want_grad["embed_tokens"]["embedding"]
    assert g.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(g - w))) < 2e-2 * float(jnp.max(jnp.abs(w)))


def test_statistics_carry_no_gradient_and_a_bad_chunk_is_refused():
    hidden = jnp.ones((2, 6, 4))
    kernel = jnp.ones((8, 4))
    targets, weights = jnp.zeros((2, 6), jnp.int32), jnp.ones((2, 6))
    ce_grad = jax.grad(lambda h: losses.head_cross_entropy(h, kernel, targets, weights, vocab_major=True,
                                                           dtype="float32", chunk_len=3)[1])(hidden)
    assert not ce_grad.any()
    with pytest.raises(ValueError, match="chunk_len 4 does not divide the sequence length 6"):
        losses.head_cross_entropy(hidden, kernel, targets, weights, vocab_major=True, dtype="float32", chunk_len=4)


@pytest.mark.parametrize("vocab_major", [True, False])
@pytest.mark.parametrize("chunk_len", [3, 6])  # a loop over 2 chunks, and one chunk
def test_the_kernel_gradient_is_an_untransposed_matmul_on_cpu(vocab_major, chunk_len):
    """Its rows-contracting matmul takes x^T materialised: XLA:CPU runs the transposed-operand form on Eigen."""
    hidden = jnp.ones((2, 6, 4))
    kernel = jnp.ones((8, 4) if vocab_major else (4, 8))
    targets, weights = jnp.zeros((2, 6), jnp.int32), jnp.ones((2, 6))
    grad = jax.jit(jax.grad(lambda h, k: losses.head_cross_entropy(h, k, targets, weights, vocab_major=vocab_major,
                                                                   dtype="float32", chunk_len=chunk_len)[0],
                            argnums=(0, 1)))
    hlo = grad.lower(hidden, kernel).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert len(dots) == 3, dots  # logits, the rows' gradient, the kernel's
    assert all("lhs_contracting_dims={1}" in line for line in dots), dots


def test_chunk_length_is_the_longest_divisor_within_the_budget():
    assert losses.logits_chunk_len(16, 128, 2048, 4 * 2 ** 20) == 32  # the default model's step on CPU
    assert losses.logits_chunk_len(16, 128, 2048, float("inf")) == 128
    assert losses.logits_chunk_len(16, 96, 2048, 4 * 2 ** 20) == 32
    assert losses.logits_chunk_len(16, 128, 2048, 1) == 1  # smaller than one position: one position per chunk
    assert steps.logits_chunk_bytes(0.0) == steps.CPU_LOGITS_CHUNK_MIB * 2 ** 20  # tests run on the CPU backend
    assert steps.logits_chunk_bytes(2.5) == 2.5 * 2 ** 20


def test_negative_chunk_budget_is_a_config_error():
    config = default.get_config()
    config.train.logits_chunk_mib = -1.0
    with pytest.raises(ConfigError, match=r"train.logits_chunk_mib=-1.0 must be >= 0 \(0 = auto\)"):
        validate(config)
