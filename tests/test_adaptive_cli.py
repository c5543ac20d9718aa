"""`launch.generate --speculative_draft_layers/--early_exit_threshold`: same text as plain greedy, telemetry, errors."""

import io

import pytest

from launch import generate as cli
from test_generate_cli import hf_model  # noqa: F401  (the exported tiny llama fixture)


def run(hf_dir, *args):
    out, err = io.StringIO(), io.StringIO()
    argv = ["--hf_dir", hf_dir, "--max_new_tokens", "8", "--prompt", "the quick", "--temperature", "0", *args]
    tokens = cli.generate_text(cli.build_parser().parse_args(argv), out, err)
    return out.getvalue(), err.getvalue(), tokens


def test_speculative_and_early_exit_flags_print_their_telemetry(hf_model):
    hf_dir = hf_model[0]
    plain_text, _, plain = run(hf_dir)
    text, err, tokens = run(hf_dir, "--speculative_draft_layers", "1", "--speculative_k", "3")
    assert (text, tokens) == (plain_text, plain)
    assert "speculative: acceptance rate" in err and "tokens/s" in err, err
    text, err, tokens = run(hf_dir, "--early_exit_threshold", "1.0")
    assert tokens == plain and "mean exit depth 2.00 of 2 layers" in err, err
    # saturation at layer 0 with a threshold every cosine passes: every decoded token runs 1 of the 2 layers
    _, err, tokens = run(hf_dir, "--early_exit_threshold", "1e-9", "--early_exit_measure", "saturation",
                         "--early_exit_layers", "0")
    assert len(tokens[0]) == 8 and "mean exit depth 1.00 of 2 layers" in err and "net of the confidence checks" in err


@pytest.mark.parametrize("args,message", [
    (["--speculative_draft_layers", "1", "--speculative_k", "0"], "speculative_k=0 must be >= 1"),
    (["--speculative_draft_layers", "2"], "speculative_draft_layers=2 must be in [1, n_layers - 1 = 1]"),
    (["--early_exit_threshold", "1.5"], "early_exit_threshold=1.5 must be in (0, 1]"),
    (["--early_exit_threshold", "0.5", "--speculative_draft_layers", "1"], "are alternatives"),
    (["--early_exit_threshold", "0.5", "--early_exit_layers", "1"],
     "early_exit_layers=1 must be increasing layer indices in [0, n_layers - 1 = 1)"),
    (["--early_exit_threshold", "0.5", "--early_exit_layers", "0,x"], "early_exit_layers='0,x' must be comma"),
    (["--early_exit_threshold", "0.5", "--early_exit_measure", "entropy"], "early_exit_measure='entropy' must be"),
])
def test_bad_adaptive_flags_give_one_error_line(hf_model, capsys, args, message):
    code = cli.main(["--hf_dir", hf_model[0], "--prompt", "the", "--max_new_tokens", "2", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("launch.generate: error:") and message in err[0], err
