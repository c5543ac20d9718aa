"""Bad input to every CLI, one table: each row gives exactly one stderr line `PROG: error: ...` (no traceback, no
orbax/tensorstore spill), a non-zero exit, runs nothing from the file, and leaves every existing file
byte-identical. Rows run in process through each CLI's `main(argv)`; a few also as real processes.

To add a CLI or a fault, add a row to CASES: (id, CLI module under launch/, argv, fragment of the error line).
argv may name the shared inputs as {placeholders}: see `world` for what exists.
"""

import importlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_train_fixtures import make_run_dir, tiny_config, write_corpus

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

CASES = [
    # launch.train: data
    ("train-missing-data", "train", ["--config={config}", "--workdir={run}", "--config.data.train_files={absent}"],
     "absent"),
    ("train-empty-data", "train", ["--config={config}", "--workdir={run}", "--config.data.train_files={empty}"],
     "empty"),
    ("train-binary-file", "train", ["--config={config}", "--workdir={run}", "--config.data.train_files={binary}"],
     "is not UTF-8 text"),
    ("train-truncated-jsonl", "train", ["--config={config}", "--workdir={run}",
                                        "--config.data.train_files={truncated_jsonl}"], "invalid JSON"),
    ("train-truncated-parquet", "train", ["--config={config}", "--workdir={run}",
                                          "--config.data.train_files={truncated_parquet}"], "cannot read parquet"),
    ("train-pickle-as-tokenizer", "train", ["--config={config}", "--workdir={fresh}", "--config.data.tokenizer={pickle}"],
     "tokenizer"),
    # launch.train: config
    ("train-missing-config-file", "train", ["--config={absent}", "--workdir={run}"], "config file not found"),
    ("train-unknown-key", "train", ["--config={config}", "--workdir={run}", "--config.train.nope=1"],
     "unknown config key 'train.nope'"),
    ("train-malformed-float", "train", ["--config={config}", "--workdir={run}", "--config.optim.learning_rate=fast"],
     "optim.learning_rate='fast' is not a valid float"),
    ("train-negative-steps", "train", ["--config={config}", "--workdir={run}", "--config.train.steps=-3"],
     "train.steps=-3 must be positive"),
    ("train-bad-on-error", "train", ["--config={config}", "--workdir={run}", "--config.checkpoint.on_error=maybe"],
     "checkpoint.on_error='maybe' must be one of"),
    ("train-zero-max-bad-steps", "train", ["--config={config}", "--workdir={run}", "--config.train.max_bad_steps=0"],
     "train.max_bad_steps=0 must be positive"),
    ("train-vocab-too-small-for-tokenizer", "train", ["--config={config}", "--workdir={fresh}",
                                                      "--config.data.tokenizer={run}/tokenizer",
                                                      "--config.model.vocab_size=64"], "smaller than the tokenizer's"),
    ("train-all-checkpoints-damaged", "train", ["--config={config}", "--workdir={damaged_run}"], "no intact checkpoint"),
    # launch.eval
    ("eval-not-a-run", "eval", ["--workdir={absent}"], "not a training run"),
    ("eval-no-such-step", "eval", ["--workdir={run}", "--step=5"], "no checkpoint for step 5"),
    ("eval-damaged-step", "eval", ["--workdir={damaged_run}", "--step=0"], "is damaged"),
    ("eval-binary-file", "eval", ["--workdir={run}", "--eval_files={binary}"], "is not UTF-8 text"),
    ("eval-missing-file", "eval", ["--workdir={run}", "--eval_files={absent}"], "absent"),
    ("eval-mesh-too-big", "eval", ["--workdir={run}", "--mesh=fsdp=16"], "need 16 devices, 8 available"),
    # launch.export_hf
    ("export-not-a-run", "export_hf", ["--workdir={absent}", "--out={fresh}/hf"], "not a training run"),
    ("export-damaged-step-keeps-existing-output", "export_hf", ["--workdir={damaged_run}", "--step=0",
                                                                "--out={existing_out}", "--overwrite"], "is damaged"),
    ("export-bad-dtype", "export_hf", ["--workdir={run}", "--out={fresh}/hf", "--dtype=int8"], "unknown dtype"),
    # launch.generate
    ("generate-damaged-run", "generate", ["--workdir={damaged_run}", "--prompt=x"], "no intact checkpoint"),
    ("generate-pickle-weights", "generate", ["--hf_dir={hf_pickle_only}", "--prompt=x"], "pickle"),
    ("generate-pickle-as-safetensors", "generate", ["--hf_dir={hf_pickle_named_safetensors}", "--prompt=x"],
     "not a readable safetensors file"),
    ("generate-missing-prompt-file", "generate", ["--workdir={run}", "--prompt_file={absent}"], "absent"),
    ("generate-malformed-mesh", "generate", ["--workdir={run}", "--prompt=x", "--mesh=tensor"], "is not axis=size"),
    # launch.import_hf
    ("import-missing-tensor", "import_hf", ["--hf_dir={hf_missing_tensor}", "--workdir={fresh}/w", "--config={config}"],
     "missing tensor"),
    ("import-wrong-shape", "import_hf", ["--hf_dir={hf_wrong_shape}", "--workdir={fresh}/w", "--config={config}"],
     "has shape"),
    ("import-wrong-dtype", "import_hf", ["--hf_dir={hf_wrong_dtype}", "--workdir={fresh}/w", "--config={config}"],
     "has dtype int32"),
    ("import-lying-header", "import_hf", ["--hf_dir={hf_lying_header}", "--workdir={fresh}/w", "--config={config}"],
     "not a readable safetensors file"),
    ("import-pickle-as-safetensors", "import_hf", ["--hf_dir={hf_pickle_named_safetensors}", "--workdir={fresh}/w",
                                                   "--config={config}"], "not a readable safetensors file"),
    ("import-pickle-weights", "import_hf", ["--hf_dir={hf_pickle_only}", "--workdir={fresh}/w", "--config={config}"],
     "pickle"),
    ("import-malformed-config-json", "import_hf", ["--hf_dir={hf_bad_config}", "--workdir={fresh}/w",
                                                   "--config={config}"], "not valid JSON"),
    ("import-into-a-run", "import_hf", ["--hf_dir={hf}", "--workdir={run}", "--config={config}"], "already holds"),
    # launch.tokenize
    ("tokenize-binary-file", "tokenize", ["--config={config}", "--out={fresh}/tok", "--config.data.train_files={binary}",
                                          "--progress=false"], "is not UTF-8 text"),
    ("tokenize-truncated-jsonl", "tokenize", ["--config={config}", "--out={fresh}/tok", "--progress=false",
                                              "--config.data.train_files={truncated_jsonl}"], "invalid JSON"),
    ("tokenize-unknown-key", "tokenize", ["--config={config}", "--out={fresh}/tok", "--config.data.nope=1"],
     "unknown config key 'data.nope'"),
    # launch.export_gguf
    ("gguf-not-a-run", "export_gguf", ["--workdir={absent}", "--out={fresh}/m.gguf"], "not a training run"),
    ("gguf-damaged-run", "export_gguf", ["--workdir={damaged_run}", "--out={fresh}/m.gguf"], "no intact checkpoint"),
    ("gguf-bad-dtype", "export_gguf", ["--workdir={run}", "--out={fresh}/m.gguf", "--dtype=q4_k"], "q4_k"),
    ("gguf-pickle-weights", "export_gguf", ["--hf_dir={hf_pickle_only}", "--out={fresh}/m.gguf"], "pickle"),
    ("gguf-existing-output-kept", "export_gguf", ["--workdir={run}", "--out={existing_out}/config.json"],
     "exists"),
    # launch.sft / launch.dpo
    ("sft-missing-data", "sft", ["--workdir={fresh}/sft", "--init={run}", "--data={absent}"], "absent"),
    ("sft-not-conversations", "sft", ["--workdir={fresh}/sft", "--init={run}", "--data={truncated_jsonl}"],
     "truncated.jsonl"),
    ("sft-init-damaged", "sft", ["--workdir={fresh}/sft", "--init={damaged_run}", "--data={truncated_jsonl}"],
     "damaged_run"),
    ("dpo-not-pairs", "dpo", ["--workdir={fresh}/dpo", "--init={run}", "--data={truncated_jsonl}"],
     "truncated.jsonl"),
    ("dpo-unknown-key", "dpo", ["--workdir={fresh}/dpo", "--init={run}", "--config.posttrain.nope=1"],
     "unknown config key 'posttrain.nope'"),
    # launch.constitutional
    ("constitutional-missing-principles", "constitutional", ["--workdir={run}", "--principles={absent}",
                                                             "--prompts={empty}", "--out={fresh}/cai"], "absent"),
    ("constitutional-binary-prompts", "constitutional", ["--workdir={run}", "--principles={principles}",
                                                         "--prompts={binary}", "--out={fresh}/cai"], "is not UTF-8 text"),
    ("constitutional-damaged-run", "constitutional", ["--workdir={damaged_run}", "--principles={principles}",
                                                      "--prompts={prompts}", "--out={fresh}/cai"], "damaged_run"),
    # launch.bench
    ("bench-unknown-benchmark", "bench", ["--only=nope"], "unknown benchmark"),
    ("bench-gpu-benchmark-on-cpu", "bench", ["--only=gpu"], "benchmark 'gpu' needs a gpu backend, this one is cpu"),
]
SUBPROCESS_CASES = ("train-binary-file", "import-pickle-as-safetensors")


class Payload:
    """Unpickling this creates the marker file: proof that a file's code was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_safetensors_parts(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every input the rows refer to, built once (no training: a step-0 run and its export)."""
    from safetensors.numpy import load_file, save_file

    from ultrathink_jax.posttrain.export import export_any_run

    root = tmp_path_factory.mktemp("world")
    train, evaluation = write_corpus(root / "corpus")
    config = root / "tiny_config.py"
    config.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom test_train_fixtures import tiny_config"
                      f"\n\ndef get_config():\n    return tiny_config({str(train)!r}, {str(evaluation)!r})\n")
    run = root / "run"
    make_run_dir(run, tiny_config(train, evaluation))
    damaged = root / "damaged_run"
    shutil.copytree(run, damaged)
    (damaged / "checkpoints" / "0" / "params" / "_METADATA").write_bytes(b"{")
    hf = root / "hf"
    export_any_run(run, hf)
    marker = root.parent / f"{root.name}-EXECUTED"
    paths = {"config": config, "run": run, "damaged_run": damaged, "hf": hf, "absent": root / "absent",
             "empty": root / "empty.txt", "binary": root / "binary.txt", "pickle": root / "weights.pkl",
             "truncated_jsonl": root / "truncated.jsonl", "truncated_parquet": root / "truncated.parquet",
             "existing_out": root / "existing_out", "marker": marker,
             "principles": REPO / "examples" / "constitutional" / "principles.jsonl",
             "prompts": REPO / "examples" / "constitutional" / "prompts.txt"}
    paths["empty"].write_text("")
    paths["binary"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    paths["pickle"].write_bytes(pickle.dumps(Payload(marker)))
    paths["truncated_jsonl"].write_text('{"text": "a whole record"}\n{"text": "cut in the mid')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["some text"] * 100}), root / "whole.parquet")
    whole = (root / "whole.parquet").read_bytes()
    paths["truncated_parquet"].write_bytes(whole[:len(whole) // 2])
    (paths["existing_out"]).mkdir()
    (paths["existing_out"] / "config.json").write_text("{}\n")

    tensors = load_file(str(hf / "model.safetensors"))
    first = sorted(tensors)[0]

    def hf_variant(name, tensors=None, edit=None):
        d = root / name
        shutil.copytree(hf, d)
        if tensors is not None:
            save_file(tensors, str(d / "model.safetensors"))
        if edit is not None:
            edit(d)
        paths[name] = d

    hf_variant("hf_missing_tensor", {k: v for k, v in tensors.items() if k != first})
    hf_variant("hf_wrong_shape", {**tensors, first: np.zeros((3, 5), np.float32)})
    hf_variant("hf_wrong_dtype", {**tensors, first: tensors[first].astype(np.int32)})

    def lie(d):
        header, body = safetensors_parts(d / "model.safetensors")
        header[first]["data_offsets"][1] += 4096  # claims more bytes than the file holds
        write_safetensors_parts(d / "model.safetensors", header, body)

    hf_variant("hf_lying_header", edit=lie)
    hf_variant("hf_pickle_named_safetensors",
               edit=lambda d: (d / "model.safetensors").write_bytes(pickle.dumps(Payload(marker))))

    def pickle_only(d):
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))

    hf_variant("hf_pickle_only", edit=pickle_only)
    hf_variant("hf_bad_config", edit=lambda d: (d / "config.json").write_text('{"model_type": "llama",'))
    return root, paths


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def argv_of(case, paths, fresh) -> list[str]:
    return [a.format(**{k: str(v) for k, v in paths.items()}, fresh=fresh) for a in case[2]]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_error_line_and_changes_nothing(world, case, tmp_path, capsys, monkeypatch):
    root, paths = world
    name, cli, _, fragment = case
    prog = f"launch.{cli}"
    monkeypatch.chdir(tmp_path)  # bench writes its report into the working directory
    before = snapshot(root)
    try:
        status = importlib.import_module(prog).main(argv_of(case, paths, tmp_path / "fresh"))
    except SystemExit as e:  # argparse
        status = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status not in (0, None), f"{name}: exit status {status}; stderr {err}"
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), f"{name}: stderr {err}"
    assert fragment in err[0], f"{name}: {fragment!r} not in {err[0]!r}"
    assert not paths["marker"].exists(), f"{name}: a pickle in the input was executed"
    after = snapshot(root)
    changed = sorted(str(p) for p in before if before[p] != after.get(p))  # (new caches may appear)
    assert not changed, f"{name}: existing files changed: {changed}"


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process_exits_2_with_one_line(world, name, tmp_path):
    root, paths = world
    case = next(c for c in CASES if c[0] == name)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", f"launch.{case[1]}", *argv_of(case, paths, tmp_path / "fresh")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"launch.{case[1]}: error: "), \
        f"exit {proc.returncode}; stderr:\n{proc.stderr}"
    assert not paths["marker"].exists()
