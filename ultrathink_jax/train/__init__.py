"""Training: config sections, optimizer, TrainState, jitted steps, the loop, and run directories.

For tools that start from a finished (or running) training run:

    from ultrathink_jax.train import load_run, checkpoint_steps
    model_config, params, tokenizer, config = load_run(workdir, step=None, mesh=None)

`load_run` restores only the parameters of checkpoint `step` (default: the newest intact one, damaged ones skipped
with a warning; `checkpoint_steps(workdir)` lists them; `run.load_run_at` also returns the step) onto `mesh` (default: FSDP over all devices), with the run's ModelConfig, tokenizer and resolved
config (an ml_collections ConfigDict: `config.data.seq_len`, ...). Missing pieces raise `RunNotFoundError` or
`CheckpointNotFoundError` (both FileNotFoundError) naming the path; a checkpoint that does not fit the model raises
`CheckpointError`.

Training itself: `train(config, workdir) -> TrainResult` (see `loop.py`); `launch.train` is the CLI. SIGTERM/SIGINT
during training checkpoint and raise `Preempted` (`preemption.py`).
"""

from ultrathink_jax.checkpoint import CheckpointError, CheckpointNotFoundError
from ultrathink_jax.train.config import sections as config_sections
from ultrathink_jax.train.loop import TrainingError, TrainResult, evaluate, train
from ultrathink_jax.train.run import LoadedRun, RunNotFoundError, checkpoint_steps, load_run, resolve_model_config

__all__ = [
    "CheckpointError", "CheckpointNotFoundError", "LoadedRun", "RunNotFoundError", "TrainResult", "TrainingError",
    "checkpoint_steps", "config_sections", "evaluate", "load_run", "resolve_model_config", "train",
]
