"""Training throughput accounting (FLOPs per token, MFU), TensorBoard writer and console progress bar.

`flops_per_token` is the one place the project counts model FLOPs; benchmarks and the trainer both use it.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ultrathink_jax.config import ModelConfig

# Dense bf16 peak per device (no sparsity), from the vendors' data sheets; keys match jax's device_kind prefix, the
# first match wins (the H100 PCIe and NVL cards before the SXM part, whose device_kind is "NVIDIA H100 80GB HBM3").
PEAK_TFLOPS = {
    "NVIDIA H200": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0, "NVIDIA H100": 989.0,
    "NVIDIA A100": 312.0, "NVIDIA L4": 121.0, "NVIDIA A10": 125.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0,
}


def matmul_params_per_token(config: ModelConfig) -> int:
    """Weights each token multiplies by in one forward pass: attention and MLP projections (for MoE layers the
    router, the k active experts and the shared expert) and the output projection. The embedding lookup is not
    a matmul; a tied output projection still is."""
    d, hd = config.d_model, config.resolved_head_dim
    attn = d * hd * (2 * config.n_heads + 2 * config.n_kv_heads)
    dense_mlp = 3 * d * config.d_ff
    moe_mlp = (d * config.n_experts + config.n_experts_per_tok * 3 * d * config.resolved_moe_d_ff
               + 3 * d * config.shared_expert_d_ff + (d if config.shared_expert_d_ff else 0))
    layers = sum(attn + (moe_mlp if config.is_moe_layer(i) else dense_mlp) for i in range(config.n_layers))
    return layers + d * config.vocab_size


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) per token: 6 per matmul weight, plus attention scores
    and values, 12 * layers * heads * head_dim * context (PaLM's count, which ignores the causal mask's
    savings; the context is min(seq_len, sliding_window)). Rematerialisation is not counted: MFU is model FLOPs."""
    context = min(seq_len, config.sliding_window) if config.sliding_window else seq_len
    attention = 12 * config.n_layers * config.n_heads * config.resolved_head_dim * context
    return 6.0 * matmul_params_per_token(config) + attention


# The CPU reference: the best FLOP/s of a few float32 matmul shapes, each timed as the fastest of several calls. One
# 1024^3 matmul, once, was beaten by the `make train` step itself (MFU above 95%: not a peak); larger and
# rectangular shapes reach more of the cores' FMA rate, and the fastest call drops a load spike on a shared machine.
PEAK_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 1024, 2048))  # (m, k, n)
PEAK_SOURCE_CPU = "measured f32 matmul on {kind}, best of " + ", ".join("x".join(map(str, s)) for s in PEAK_SHAPES)


@functools.lru_cache(maxsize=None)
def _measured_peak_flops(device: jax.Device, repeats: int = 3) -> float:
    """The best FLOP/s of the PEAK_SHAPES float32 matmuls on `device` (the fastest of `repeats` calls each): the
    reference where no data-sheet peak is known (CPU)."""
    best = 0.0
    # A one-device mesh of its own: under the trainer's mesh a one-device jit would be rejected.
    with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("one",))):
        f = jax.jit(lambda x, y: x @ y)
        for m, k, n in PEAK_SHAPES:
            a = jax.device_put(jnp.ones((m, k), jnp.float32), device)
            b = jax.device_put(jnp.ones((k, n), jnp.float32), device)
            f(a, b).block_until_ready()
            for _ in range(repeats):
                start = time.perf_counter()
                f(a, b).block_until_ready()
                best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


def peak_flops_per_device(override_tflops: float = 0.0) -> tuple[float, str]:
    """(FLOP/s, where the number comes from): the override, the data-sheet table, or a measured matmul."""
    if override_tflops:
        return override_tflops * 1e12, "configured log.peak_tflops"
    device = jax.local_devices()[0]  # jax.devices()[0] may belong to another process
    kind = datasheet_kind(device.device_kind)
    if kind:
        return PEAK_TFLOPS[kind] * 1e12, f"{kind} bf16 data sheet"
    return _measured_peak_flops(device), PEAK_SOURCE_CPU.format(kind=device.device_kind)


def datasheet_kind(device_kind: str) -> str:
    """The PEAK_TFLOPS key a device_kind falls under ('' = none)."""
    return next((kind for kind in PEAK_TFLOPS if device_kind.startswith(kind)), "")


def mfu(tokens_per_second: float, flops_per_token_: float, peak_flops_total: float) -> float:
    return tokens_per_second * flops_per_token_ / peak_flops_total


class Writer:
    """TensorBoard scalars (tensorboardX) in `logdir`; a no-op when disabled (processes other than 0)."""

    def __init__(self, logdir: str | os.PathLike, enabled: bool = True):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=str(logdir))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self._writer.add_scalar(tag, float(value), step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def format_rate(tokens_per_second: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if tokens_per_second >= scale:
            return f"{tokens_per_second / scale:.1f}{unit}"
    return f"{tokens_per_second:.0f}"


class Progress:
    """One console line per update: `step 120/600 [####------] loss 3.21 | 12.3k tok/s | ETA 2m10s`.
    Redraws in place on a terminal, else prints a line per update (logs stay readable)."""

    def __init__(self, total_steps: int, enabled: bool = True, stream=None, width: int = 24, bar: bool = True):
        # enabled=False silences everything (processes other than 0); bar=False only the progress lines, so
        # evaluations, warnings and the summary still print (log.progress=False)
        self.total, self.enabled, self.width, self.bar = total_steps, enabled, width, enabled and bar
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self, step: int, loss: float, tokens_per_second: float, eta_seconds: float) -> str:
        filled = int(self.width * step / max(self.total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        return (f"step {step}/{self.total} [{bar}] loss {loss:.4f} | {format_rate(tokens_per_second)} tok/s | "
                f"ETA {format_duration(eta_seconds)}")

    def update(self, step: int, loss: float, tokens_per_second: float, eta_seconds: float) -> None:
        if not self.bar:
            return
        text = self.line(step, loss, tokens_per_second, eta_seconds)
        self.stream.write(f"\r{text}\x1b[K" if self.tty else text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line that must not be overwritten by the bar (eval results, checkpoints)."""
        if self.enabled:
            self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar and self.tty:
            self.stream.write("\n")
            self.stream.flush()
