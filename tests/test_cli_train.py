"""launch.train and launch.eval end to end, in process: train, sample, resume, evaluate."""

import re
from pathlib import Path

import pytest

from launch import eval as eval_cli
from launch import train as train_cli
from test_train_fixtures import write_corpus

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def corpus_with_bad_bytes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    train, evaluation = write_corpus(directory)
    train.write_bytes(train.read_bytes() + b"\n\nthe cat \xff sat on a mat .\n")  # invalid UTF-8
    return train, evaluation


def test_train_then_resume_then_eval(capsys, corpus_with_bad_bytes, tmp_path):
    train_file, eval_file = corpus_with_bad_bytes
    config = tmp_path / "config.py"
    config.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom test_train_fixtures import tiny_config\n\n"
                      f"def get_config():\n    return tiny_config({str(train_file)!r}, {str(eval_file)!r})\n")
    workdir = tmp_path / "run"
    argv = [f"--config={config}", f"--workdir={workdir}", "--config.train.sample_tokens=6",
            "--config.train.sample_prompt=the cat", "--config.log.progress=true"]

    assert train_cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "(1 invalid UTF-8 sequences replaced with U+FFFD)" in err, err
    assert re.search(r"step 12/12 \[#+\] loss \d+\.\d+ \| .* tok/s \| ETA", err), err
    assert re.search(r"done: steps 0->12 of 12 .* eval loss \d+\.\d+ \(perplexity \d+\.\d+\)", err), err
    assert "sample:\nthe cat" in err, err

    assert train_cli.main(argv) == 0  # re-running the same command resumes (here: nothing left to train)
    err = capsys.readouterr().err
    assert "resumed from checkpoint step 12" in err and "done: steps 12->12 of 12 in" in err, err
    assert "(nothing left to train)" in err, err

    assert eval_cli.main([f"--workdir={workdir}", f"--eval_files={eval_file}"]) == 0
    out = capsys.readouterr().out
    expected = rf"step 12: loss \d+\.\d+ perplexity \d+\.\d+ over \d+ tokens \({re.escape(str(eval_file))}\)\n"
    assert re.fullmatch(expected, out), out
