"""The GPU benchmark's parts that run anywhere (no timing asserted): its cases are the issue's shapes, its packed rows
hold several documents, its loss comparison measures the segment-exact loss, its step measurement runs the trainer's
step, and launch.bench skips it off a GPU. The cuDNN side itself needs a GPU (BENCHMARKS.md says whether one ran)."""

import argparse

import jax
import numpy as np
import pytest

from model_fixtures import init, single_device_mesh, tiny_config
from ultrathink_jax import losses, metrics, sharding
from ultrathink_jax.bench import gpu
from ultrathink_jax.model import Transformer


def test_cases_are_small_and_moe_small_in_bf16_at_seq_2048_with_auto_attention():
    cases = gpu.cases(quick=False)
    assert set(cases) == {"small", "moe_small"}
    for name, config in cases.items():
        assert (config.model.dtype, config.data.seq_len, config.model.attention_impl) == ("bfloat16", 2048, "auto")
        assert (config.data.global_batch_size, config.train.grad_accum) == (gpu.ROWS, 1)
    assert cases["small"].model.d_model == 1024 and cases["small"].model.n_experts == 0
    assert cases["moe_small"].model.n_experts == 8


def test_packed_rows_hold_several_documents_with_positions_restarting():
    batch = gpu.packed_batch(rows=3, seq_len=256, vocab=100, seed=0, mean_document_tokens=40)
    assert batch["inputs"].shape == (3, 256)
    for seg, pos, w in zip(batch["segment_ids"], batch["positions"], batch["weights"]):
        starts = np.flatnonzero(np.diff(seg)) + 1
        assert len(starts) >= 2  # at least three documents in the row
        assert (pos[starts] == 0).all() and pos[0] == 0
        assert (w[starts - 1] == 0).all()  # no loss from one document's last token to the next one's first


def test_mean_loss_on_packed_rows_is_each_document_on_its_own():
    config = tiny_config(max_seq_len=128)
    params = init(config)
    batch = gpu.packed_batch(rows=2, seq_len=128, vocab=config.vocab_size, seed=1, mean_document_tokens=25)
    with sharding.activate(single_device_mesh()):
        packed = gpu.mean_losses(config, params, batch, ("xla",))["xla"]
    total = weight = 0.0
    for r in range(2):
        for s in np.unique(batch["segment_ids"][r]):
            at = batch["segment_ids"][r] == s
            doc = {k: v[r][at][None] for k, v in batch.items()}
            logits, _, _ = Transformer(config).apply({"params": params}, doc["inputs"], doc["positions"],
                                                     np.ones_like(doc["segment_ids"]))
            s_sum, w_sum = losses.cross_entropy(logits, doc["targets"], doc["weights"])
            total, weight = total + float(s_sum), weight + float(w_sum)
    assert packed == pytest.approx(total / weight, rel=1e-5)


def test_measure_runs_the_trainer_step_on_packed_rows():
    r = gpu.measure(gpu.cases(quick=True)["moe_small"], repeats=1, warmup=1)
    assert r["model"].n_experts == 8 and r["model"].dtype == "bfloat16"
    assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and np.isfinite(r["loss"])
    peak, _ = metrics.peak_flops_per_device()
    expected = metrics.mfu(r["tokens_per_s"], metrics.flops_per_token(r["model"], 128), peak * jax.device_count())
    assert r["mfu"] == pytest.approx(expected, rel=0.2)  # the peak is re-measured: only its order is checked


def test_the_data_sheet_peak_tells_h100_cards_apart():
    assert metrics.datasheet_kind("NVIDIA H100 80GB HBM3") == "NVIDIA H100"
    assert metrics.PEAK_TFLOPS[metrics.datasheet_kind("NVIDIA H100 PCIe")] == 756.0
    assert metrics.PEAK_TFLOPS[metrics.datasheet_kind("NVIDIA H100 NVL")] == 835.0
    assert metrics.datasheet_kind("NVIDIA A100-SXM4-80GB") == "NVIDIA A100"
    assert metrics.datasheet_kind("cpu") == ""


def test_launch_bench_skips_the_gpu_benchmark_off_a_gpu_and_keeps_its_saved_section(tmp_path, monkeypatch, capsys):
    from launch import bench

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "available", lambda: ["gpu"])
    saved = tmp_path / "benchmarks" / "gpu.md"
    saved.parent.mkdir()
    saved.write_text("## measured on a GPU\n")
    assert bench.run_benchmarks(argparse.Namespace(only="", quick=False)) == 0
    assert "skipped gpu: needs a gpu backend, this one is cpu" in capsys.readouterr().err
    assert saved.read_text() == "## measured on a GPU\n"
    assert (tmp_path / "BENCHMARKS.md").read_text() == "# UltraThink-JAX benchmarks\n\n## measured on a GPU\n"


def test_the_report_has_a_row_per_model_and_the_loss_check(monkeypatch):
    # cuDNN cannot run off a GPU: both "implementations" are the XLA path here, so the report's gap is 0.
    real = gpu.mean_losses
    monkeypatch.setattr(gpu, "mean_losses", lambda model, params, batch, impls: {
        impl: real(model, params, batch, ("xla",))["xla"] for impl in impls})
    report = gpu.run(quick=True)
    assert report.count("| small |") == 1 and report.count("| moe_small |") == 1
    assert "40% " in report and "30% " in report
    assert report.count("|gap| 0.00e+00 (within 0.001") == 2


def test_a_failing_train_step_is_reported_and_the_xla_path_measured_instead(monkeypatch):
    real_measure = gpu.measure

    def measure(config, repeats):
        if config.model.attention_impl == "auto":  # as cuDNN's backward might on a GPU
            raise ValueError("cuDNN says no\nsecond line")
        return real_measure(config, repeats)

    monkeypatch.setattr(gpu, "measure", measure)
    monkeypatch.setattr(gpu, "mean_losses", lambda model, params, batch, impls: (_ for _ in ()).throw(
        RuntimeError("no cuDNN here")))
    report = gpu.run(quick=True)
    for name in ("small", "moe_small"):
        assert f"| {name} | | auto | failed: ValueError: cuDNN says no | | | | |" in report
        assert f"| {name} | 0M | xla | " in report
        assert f"- {name}: failed: RuntimeError: no cuDNN here" in report
    assert "second line" not in report
