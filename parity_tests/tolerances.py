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
# Gradients, per parameter tensor: max|Δ| <= GRAD_REL * max|reference grad| + GRAD_ATOL.
GRAD_REL = 1e-4
GRAD_ATOL = 1e-7


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
        f"{what}: max|Δ|={dev:.3e} at index {where} (twin {float(actual[where]):.6f} vs reference "
        f"{float(expected[where]):.6f}) exceeds {LOGITS_REL:g}·max(1, max|ref|={scale:.3f}) = {tol:.3e}"
    )


def assert_loss_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "loss") -> None:
    a, e = float(actual), float(expected)
    tol = LOSS_REL * max(1.0, abs(e))
    assert abs(a - e) <= tol, f"{what}: twin {a:.8f} vs reference {e:.8f}, |Δ|={abs(a - e):.3e} > {tol:.3e}"


def assert_aux_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    a, e = float(actual), float(expected)
    assert abs(a - e) <= AUX_LOSS_ATOL, f"aux loss: twin {a:.9f} vs reference {e:.9f}, |Δ|={abs(a - e):.3e} > {AUX_LOSS_ATOL:g}"


def assert_grads_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every reference gradient must have a twin counterpart within tolerance; reports the worst tensor."""
    missing = sorted(set(expected) ^ set(actual))
    assert not missing, f"gradient sets differ, e.g. {missing[:3]}"
    failures = []
    for name, ref in expected.items():
        dev, where = worst(actual[name], ref)
        tol = GRAD_REL * float(ref.abs().max()) + GRAD_ATOL
        if dev > tol:
            failures.append((dev / tol, f"{name}: max|Δ|={dev:.3e} at {where}, tolerance {tol:.3e}"))
    assert not failures, f"{len(failures)} gradient(s) off; worst: " + max(failures)[1]

# Training parity (JAX/optax vs twin/torch.optim, 20 AdamW steps): per-step loss, |Δ| <= TRAIN_LOSS_REL * max(1, |twin|).
TRAIN_LOSS_REL = 1e-4
