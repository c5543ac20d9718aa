"""Each preset is a recipe that trains as shipped: its tokenizer, vocabulary, context and schedule fit together, and
launch.train runs it for 2 steps with only the model (and the batch shape) shrunk to CPU size.

Compiling a train step costs seconds on 2 cores, so the 2-step runs cover each distinct recipe once (trained BPE vs
shipped GPT-2 tokenizer, float32 vs bf16 + remat, dense vs MoE, 1 or 8 micro-batches); every other preset is
checked to differ from one of those only in numbers that change no code path (size, learning rate, batch, steps)."""

import json
import logging

import pytest

from launch import train as train_cli
from test_train_fixtures import write_corpus
from ultrathink_jax import configs
from ultrathink_jax.data import load_tokenizer
from ultrathink_jax.train.config import warmup_steps

PRETRAINING = ["tiny", "small", "medium", "large", "xl", "moe_tiny", "moe_small", "moe_medium", "moe_large",
               "moe_xl", "benchmark"]
CPU_SIZED = ["default", "moe_default"]  # a BPE trained on the data, model vocab sized from it
TRAINED = {"default": [], "moe_default": [],
           "tiny": ["small", "medium", "large", "xl", "benchmark"],
           "moe_tiny": ["moe_small", "moe_medium", "moe_large", "moe_xl"]}
NUMBERS = {"model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.d_ff", "model.moe_d_ff",
           "data.global_batch_size", "train.grad_accum", "train.steps", "optim.learning_rate"}
TOY_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64}
ROWS_PER_MICRO_BATCH = 8  # one row per simulated device


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_train_docs=20)[0]


@pytest.mark.parametrize("name", PRETRAINING)
def test_pretraining_preset_names_a_shipped_tokenizer_of_the_models_vocabulary_at_full_context(name):
    config = configs.get(name)
    assert config.data.tokenizer == "builtin:gpt2"
    assert load_tokenizer(config.data.tokenizer).vocab_size == config.model.vocab_size == config.data.vocab_size
    assert config.data.seq_len == config.model.max_seq_len == 2048
    tokens_per_step = config.data.global_batch_size * config.data.seq_len
    assert tokens_per_step >= 2**16, f"{name}: {tokens_per_step} tokens per step"
    assert 0 < warmup_steps(config.optim, config.train.steps) < config.train.steps // 10


def flat(config, prefix=""):
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_trained_presets_stand_for_every_other_one():
    assert sorted([*TRAINED, *sum(TRAINED.values(), [])]) == sorted(PRETRAINING + CPU_SIZED)
    for trained, others in TRAINED.items():
        reference = flat(configs.get(trained))
        for name in others:
            other = flat(configs.get(name))
            assert other.keys() == reference.keys()
            differ = {k for k in reference if other[k] != reference[k]}
            assert differ <= NUMBERS, f"{name} vs {trained}: {sorted(differ - NUMBERS)}"


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_preset_trains_two_steps_at_toy_width_through_launch_train(name, corpus, tmp_path, capsys, caplog):
    config = configs.get(name)
    toy = dict(TOY_MODEL, **({"moe_d_ff": 32} if config.model.n_experts else {}))
    rows = ROWS_PER_MICRO_BATCH * config.train.grad_accum  # the recipe's accumulation, kept
    workdir = tmp_path / "run"
    argv = [f"--config=configs/{name}.py", f"--workdir={workdir}",
            *(f"--config.model.{k}={v}" for k, v in toy.items()),
            f"--config.data.train_files={corpus}", "--config.data.txt_split=paragraph", "--config.data.seq_len=32",
            f"--config.data.global_batch_size={rows}", "--config.data.read_threads=1", "--config.train.steps=2",
            "--config.train.sample_tokens=0", "--config.log.progress=false", "--config.log.peak_tflops=1"]
    with caplog.at_level(logging.WARNING, logger="ultrathink_jax.train.run"):
        assert train_cli.main(argv) == 0, capsys.readouterr().err
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # no vocabulary mismatch
    model = json.loads((workdir / "model_config.json").read_text())
    tokenizer = load_tokenizer(workdir / "tokenizer")
    expected_vocab = config.model.vocab_size or -(-tokenizer.vocab_size // 64) * 64
    assert model["vocab_size"] == expected_vocab
    assert (model["dtype"], model["n_experts"]) == (config.model.dtype, config.model.n_experts)
    assert (workdir / "checkpoints" / "2").is_dir()


def test_warmup_as_long_as_the_run_stops_launch_train_with_one_line(tmp_path, capsys):
    argv = ["--config=configs/small.py", f"--workdir={tmp_path / 'run'}", "--config.train.steps=100",
            "--config.optim.warmup_fraction=0.999"]
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["launch.train: error: config: optim.warmup_fraction=0.999 gives 100 warmup steps, which must be "
                   "< train.steps=100 (the whole run would be warmup)"], err
    assert not (tmp_path / "run").exists()
