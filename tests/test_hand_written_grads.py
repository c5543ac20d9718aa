"""Hand-written backward passes against autodiff: the float32 attention's (`softmax_attention_f32`), the MoE
tiles' batched matmul (`layers.linear.batched_matmul`) and the small kernels' matmul
(`layers.linear.small_kernel_matmul`), and that their matmuls have untransposed operands on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultrathink_jax.layers.attention import attention_mask, grouped_attention, mask_bias
from ultrathink_jax.layers import linear
from ultrathink_jax.layers.linear import batched_matmul, small_kernel_matmul


def textbook_attention(q, k, v, mask, scale):
    """softmax(q k^T * scale + bias) v with each KV head repeated for its query heads (h // group)."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) * scale + mask_bias(mask)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize("n_heads,n_kv_heads,prefix,window", [(4, 2, 0, 0), (4, 4, 0, 3), (6, 2, 5, 0)])
def test_gradients_equal_autodiff_of_the_textbook_form(n_heads, n_kv_heads, prefix, window):
    """GQA and MHA, packed segments with padding, a sliding window, and keys longer than the queries (a cache
    prefix of `prefix` positions): loss and gradients in q, k and v agree."""
    B, T, hd = 2, 9, 8
    S = prefix + T
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, n_heads, hd)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, S, n_kv_heads, hd)), jnp.float32) for _ in range(2))
    segments = np.ones((B, S), np.int32)
    segments[1, prefix + 4:] = 2  # row 1 packs a second document
    segments[1, -2:] = 0  # and ends in padding
    mask = attention_mask(prefix + jnp.arange(T), jnp.arange(S), jnp.asarray(segments[:, prefix:]),
                          jnp.asarray(segments), window)
    weights = jnp.asarray(rng.normal(size=(B, T, n_heads, hd)), jnp.float32)

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(weights * fn(q, k, v, mask, hd ** -0.5)),
                                          argnums=(0, 1, 2)))

    (ours, ours_grads), (ref, ref_grads) = loss(grouped_attention)(q, k, v), loss(textbook_attention)(q, k, v)
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    for name, a, b in zip("qkv", ours_grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"d{name}")


def assert_every_matmul_contracts_the_lhs_last_axis(hlo: str, n_dots: int):
    """XLA:CPU runs a batched matmul contracting another axis of its left operand (the leading row axis, as
    P^T dO, dS^T Q and tile^T dy do) on Eigen, not YNNPACK."""
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert len(dots) >= n_dots, dots
    for line in dots:
        lhs_rank = line.split("dot(")[0].split("[")[1].split("]")[0].count(",") + 1  # output rank = lhs rank here
        assert f"lhs_contracting_dims={{{lhs_rank - 1}}}" in line, line


def test_the_attention_backward_has_no_transposed_operand_matmul_on_cpu():
    q = jnp.zeros((2, 16, 4, 8), jnp.float32)
    k = v = jnp.zeros((2, 16, 2, 8), jnp.float32)
    mask = attention_mask(jnp.arange(16), jnp.arange(16), jnp.ones((2, 16), jnp.int32), jnp.ones((2, 16), jnp.int32), 0)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(grouped_attention(q, k, v, mask, 0.3)), argnums=(0, 1, 2)))
    assert_every_matmul_contracts_the_lhs_last_axis(grad.lower(q, k, v).compile().as_text(), 6)  # 2 fwd, 4 bwd


def test_batched_matmul_gradients_equal_autodiff_and_use_untransposed_operands():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(5, 16, 8)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(5, 8, 12)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 16, 12)), jnp.float32)

    def grads(fn):
        return jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(w * jnp.tanh(fn(a, b))), argnums=(0, 1)))

    (ours, (da, db)), (ref, (ref_da, ref_db)) = (grads(batched_matmul)(a, b),
                                                 grads(lambda a, b: jnp.einsum("ntd,ndf->ntf", a, b))(a, b))
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    np.testing.assert_allclose(da, ref_da, atol=1e-5)
    np.testing.assert_allclose(db, ref_db, atol=1e-5)
    assert_every_matmul_contracts_the_lhs_last_axis(grads(batched_matmul).lower(a, b).compile().as_text(), 3)


def test_small_kernel_matmul_gradients_equal_autodiff_and_use_untransposed_operands():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 24)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(32, 24)), jnp.float32)

    def grads(fn):
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(t * jnp.tanh(fn(x, w))), argnums=(0, 1)))

    (ours, (dx, dw)), (ref, (ref_dx, ref_dw)) = grads(small_kernel_matmul)(x, w), grads(jnp.matmul)(x, w)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    np.testing.assert_allclose(dx, ref_dx, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, atol=1e-5)
    assert_every_matmul_contracts_the_lhs_last_axis(grads(small_kernel_matmul).lower(x, w).compile().as_text(), 3)
    assert "lhs_contracting_dims={0}" in grads(jnp.matmul).lower(x, w).compile().as_text()  # autodiff's x^T dy


def test_linear_takes_the_small_kernel_path_only_for_small_kernels(monkeypatch):
    calls = []
    monkeypatch.setattr(linear, "small_kernel_matmul", lambda x, w: calls.append(w.shape) or x @ w)
    linear.matmul(jnp.zeros((4, 16)), jnp.zeros((16, 8)))
    monkeypatch.setattr(linear, "CPU_SMALL_KERNEL_ELEMENTS", 100)
    linear.matmul(jnp.zeros((4, 16)), jnp.zeros((16, 8)))
    assert calls == [(16, 8)]
