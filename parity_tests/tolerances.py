"""The one place parity tolerances live. Every parity test (twin vs transformers, JAX vs twin) uses these.

All comparisons are fp32 on CPU.
"""

from __future__ import annotations

import torch

# Logits: max|Δ| <= LOGITS_REL * max(1, max|reference logit|).
LOGITS_REL = 1e-5
# Scalar losses (CE, CE + coef * aux): |Δ| <= LOSS_REL * max(1, |reference|).
LOSS_REL = 1e-5
# Load-balancing aux loss: absolute.
AUX_LOSS_ATOL = 1e-6
# Gradients, per parameter tensor: max|Δ| <= rel * max|reference grad| + atol; (GRAD_REL, GRAD_ATOL) unless stated
# (twin vs transformers, test_twin_grad).
GRAD_REL = 1e-4
GRAD_ATOL = 1e-7
# JAX vs twin, every parameter's gradient (the bound). Measured 2026-12-02 with test_jax_grad's cases (the
# trainer's objective with z-loss on packed rows; dense / mixtral / qwen2_moe, random and trained weights): worst
# max|Δ| / max|g_twin| over all tensors 1.92e-6 (dense trained, layer 1 k_proj); every case 9.8e-7 .. 1.92e-6.
JAX_TWIN_GRAD_REL = 1e-5
# Absolute floor for the 1e-5 comparisons: only for tensors whose gradient is exactly or nearly zero (experts no
# token chose); far below 1e-5 * max|g| of any real gradient here (>= 5e-3, so >= 5e-8).
FP32_GRAD_ATOL = 1e-10
# Same JAX model on 8 simulated devices vs 1 (test_jax_mesh: fsdp8, data2 x fsdp2 x tensor2, tensor2 x fsdp4,
# expert4 x fsdp2). Measured 2025-11-25: worst max|Δ| / max|g_1dev| 1.95e-6 (dense, tensor-parallel meshes);
# logits max|Δ| / max|logit| <= 5e-7 and loss |Δ| <= 9.5e-7, well inside LOGITS_REL / LOSS_REL.
MESH_GRAD_REL = 1e-5

# bf16 vs fp32, KL(p_fp32 || p_bf16) of next-token distributions per token (test_jax_bf16: trained parity models,
# 96 held-out text tokens each, float64 KL from float32 logits). Measured 2025-11-25 on CPU (XLA):
#   JAX, params fp32 + compute bf16: mean 4.7e-5 / 5.8e-5 / 4.0e-5, max 2.0e-4 / 5.7e-4 / 2.1e-4 (dense / mixtral /
#   qwen2_moe). Bounds ~3.5x over the worst. Sanity (not a test): fp32 logits + N(0, 0.02^2) noise gives mean 1.3e-4,
#   + N(0, 0.05^2) mean 8.3e-4 (fails); RMSNorm computed in bf16 instead of fp32 gives mean 1.1e-4 / 1.5e-4 / 5.3e-5,
#   max 8.9e-4 / 6.3e-3 / 2.4e-4 (fails only on mixtral's max: at d_model=32 a bf16 norm costs little).
BF16_KL_MEAN = 2e-4
BF16_KL_MAX = 2e-3
#   twin / transformers loaded in bf16 (bf16 weights and compute) vs JAX fp32: mean up to 2.2e-4, max up to 1.7e-2
#   (qwen2_moe: bf16 router logits flip near-tied top-k choices for a few tokens). Bounds ~4x over the worst.
TORCH_BF16_KL_MEAN = 1e-3
TORCH_BF16_KL_MAX = 6e-2


def worst(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    """Largest absolute deviation and its index."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != reference shape {tuple(expected.shape)}")
    diff = (actual.detach().double() - expected.detach().double()).abs()
    flat = int(diff.argmax())
    return float(diff.max()), tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "logits") -> None:
    dev, where = worst(actual, expected)
    scale = max(1.0, float(expected.detach().abs().max()))
    tol = LOGITS_REL * scale
    assert dev <= tol, (
        f"{what}: max|Δ|={dev:.3e} at index {where} ({float(actual[where]):.6f} vs reference "
        f"{float(expected[where]):.6f}) exceeds {LOGITS_REL:g}·max(1, max|ref|={scale:.3f}) = {tol:.3e}"
    )


def assert_loss_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "loss") -> None:
    a, e = float(actual), float(expected)
    tol = LOSS_REL * max(1.0, abs(e))
    assert abs(a - e) <= tol, f"{what}: {a:.8f} vs reference {e:.8f}, |Δ|={abs(a - e):.3e} > {tol:.3e}"


def assert_aux_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    a, e = float(actual), float(expected)
    assert abs(a - e) <= AUX_LOSS_ATOL, f"aux loss: twin {a:.9f} vs reference {e:.9f}, |Δ|={abs(a - e):.3e} > {AUX_LOSS_ATOL:g}"


def assert_grads_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rel: float = GRAD_REL,
                       atol: float = GRAD_ATOL, what: str = "gradients") -> None:
    """Every reference gradient must have a counterpart within rel * max|ref| + atol; reports the worst tensor."""
    missing = sorted(set(expected) ^ set(actual))
    assert not missing, f"{what}: gradient sets differ, e.g. {missing[:3]}"
    failures = []
    for name, ref in expected.items():
        dev, where = worst(actual[name], ref)
        scale = float(ref.abs().max())
        tol = rel * scale + atol
        if dev > tol:
            failures.append((dev / tol, f"{name}: max|Δ|={dev:.3e} at {where} = {dev / max(scale, 1e-30):.2e}·max|ref| "
                                        f"(max|ref|={scale:.3e}), tolerance {rel:g}·max|ref| + {atol:g} = {tol:.3e}"))
    assert not failures, f"{what}: {len(failures)} gradient(s) off; worst: " + max(failures)[1]

# Training parity (test_jax_train: the trainer's train_step vs the twin's, 20 steps, packed, grad_accum 2): per-step
# loss, z-loss, MoE loss, grad norm and learning rate, |Δ| <= TRAIN_LOSS_REL * |twin|; final parameters, per tensor,
# max|Δ| <= TRAIN_PARAM_REL * max|p_twin|.
TRAIN_LOSS_REL = 1e-4
TRAIN_PARAM_REL = 1e-4
# llama.cpp (GGUF through llama-cpp-python, CPU) vs JAX, next-token logits: max|Δ| <= rel * max(1, max|logit|)
# (test_gguf_llamacpp). f32 is the bound (met only with a float32 KV cache: llama.cpp's default f16 cache
# alone gave 4.5e-4 on the dense model; with it, measured 2026-12-01: dense 7.7e-7 / 5.8e-7, mixtral 4.7e-7 / 4.2e-7
# with the trained BPE / GPT-2 tokenizer). q8_0 (weights AND llama.cpp's q8 activations) vs JAX f32, measured
# 2026-12-01 on the test's random-weight models over 96 tokens: dense 2.41e-2, mixtral 1.97e-1 -- the Mixtral error
# is expert choices flipping where two router probabilities are within the quantization noise (its router weights
# stay f32), which moves whole tokens' logits. Bounds are ~2x the measured worst.
GGUF_LOGITS_REL = 1e-4
GGUF_Q8_0_LOGITS_REL = {"dense": 5e-2, "mixtral": 4e-1}
