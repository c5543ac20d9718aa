"""launch.eval and launch.generate run on the mesh the run's config names (as training does), or on --mesh."""

import json
import shutil

import pytest

from launch import eval as eval_cli
from launch import generate as generate_cli
from test_train_fixtures import make_run_dir, tiny_config, write_corpus
from ultrathink_jax import cli
from ultrathink_jax.train.perplexity import evaluate_run

RUN_MESH = {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A step-0 run whose config says tensor=2 x fsdp=4 (the default would be fsdp over all 8 devices)."""
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    workdir = tmp_path_factory.mktemp("run")
    make_run_dir(workdir, tiny_config(*corpus, **{"mesh.tensor": 2, "mesh.fsdp": 4}), seed=1)
    return workdir


def test_eval_runs_on_the_run_mesh_and_scores_the_same_on_one_device(run_dir):
    on_run_mesh = evaluate_run(run_dir)
    on_one_device = evaluate_run(run_dir, mesh=cli.mesh_from_flag("fsdp=1"))
    assert on_run_mesh["mesh"] == RUN_MESH and on_one_device["mesh"] == ONE_DEVICE
    assert on_run_mesh["tokens"] == on_one_device["tokens"]
    assert on_run_mesh["loss"] == pytest.approx(on_one_device["loss"], rel=1e-5), \
        f"loss {on_run_mesh['loss']} on {RUN_MESH} vs {on_one_device['loss']} on one device"


def test_eval_reports_a_run_mesh_that_does_not_fit_the_devices(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    config["mesh"]["tensor"] = 3
    (run / "config.json").write_text(json.dumps(config))
    assert eval_cli.main([f"--workdir={run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("launch.eval: error: mesh:") and "need 12 devices, 8 available" in err[0], err


def generate_args(*argv):
    parser = generate_cli.build_parser()
    args = parser.parse_args(list(argv))
    cli.check_model_source(parser, args)
    return args


@pytest.mark.parametrize("flag, want", [([], RUN_MESH), (["--mesh=fsdp=1"], ONE_DEVICE),
                                        (["--mesh=tensor=2,fsdp=-1"], {**RUN_MESH, "fsdp": 4})])
def test_generate_loads_onto_the_run_mesh_unless_mesh_is_given(run_dir, flag, want):
    *_, mesh = generate_cli.load_model(generate_args(f"--workdir={run_dir}", "--prompt=x", *flag))
    assert dict(mesh.shape) == want  # the engine's sharded decoding itself: test_generate_engine.py


def test_step_with_hf_dir_is_refused_rather_than_ignored(capsys):
    with pytest.raises(SystemExit) as stop:
        generate_cli.main(["--hf_dir=somewhere", "--step=3", "--prompt=x"])
    assert stop.value.code == 2 and "--step applies to --workdir only" in capsys.readouterr().err
