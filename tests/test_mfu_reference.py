"""The CPU MFU reference is a peak: the `make train` step (configs/default.py on one CPU device, as `make train` runs
it) does not beat it, and the printed line names how it was measured."""

import os
import re
import subprocess
import sys

from conftest import REPO
from ultrathink_jax import metrics


def test_make_train_step_stays_below_the_cpu_reference(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}  # one device, as make train
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-m", "launch.train", "--config=configs/default.py",
                          "--config.train.steps=30", "--config.data.default_corpus_max_chars=400000",
                          "--config.eval.every_steps=0", "--config.checkpoint.every_steps=30",
                          "--config.train.sample_tokens=0", "--config.log.progress=false", f"--workdir={tmp_path / 'run'}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    found = re.search(r"MFU ([0-9.]+)% \(peak: ([^)]*)\)", out.stderr)
    assert found, out.stderr[-2000:]
    assert found.group(2) == metrics.PEAK_SOURCE_CPU.format(kind="cpu"), found.group(2)
    assert 0 < float(found.group(1)) < 100, f"the step beat its reference: {found.group(0)}"
