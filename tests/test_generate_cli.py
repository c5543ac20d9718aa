"""`python -m launch.generate`: text out equals the token API's, batching and samples, streaming order, errors."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from launch import generate as cli
from model_fixtures import tiny_config
from ultrathink_jax.data import train_tokenizer
from ultrathink_jax.generate import generate
from ultrathink_jax.generate.stream import OrderedStream
from ultrathink_jax.hf import export_params
from ultrathink_jax.params import abstract_params

TEXT = ["the quick brown fox jumps over the lazy dog. " * 3, "to be or not to be, that is the question. " * 3]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(hf_dir, config, params, tokenizer): a tiny llama exported with its tokenizer."""
    tokenizer = train_tokenizer(TEXT, 300)
    cfg = tiny_config(vocab_size=320)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.15, jnp.float32),
                          nn.unbox(abstract_params(cfg)))
    out = export_params(params, cfg, tmp_path_factory.mktemp("hf") / "model", tokenizer=tokenizer)
    return str(out), cfg, params, tokenizer


def run_cli(hf_dir, *args):
    out, err = io.StringIO(), io.StringIO()
    argv = ["--hf_dir", hf_dir, "--max_new_tokens", "6", *args]
    tokens = cli.generate_text(cli.build_parser().parse_args(argv), out, err)
    return out.getvalue(), tokens


def test_greedy_text_is_the_prompt_then_the_decoded_tokens_of_the_api(hf_model):
    hf_dir, cfg, params, tokenizer = hf_model
    text, _ = run_cli(hf_dir, "--prompt", "the quick", "--temperature", "0")
    want = generate(params, cfg, [tokenizer.encode("the quick")], 6, eos_id=tokenizer.eos_id)[0]
    assert text == "the quick" + tokenizer.decode(want, skip_special_tokens=True) + "\n"


def test_prompts_and_samples_print_one_block_each_in_order(hf_model):
    hf_dir, _, _, tokenizer = hf_model
    text, tokens = run_cli(hf_dir, "--prompt", "to be", "--prompt", "the lazy", "--num_samples", "2", "--seed", "5")
    blocks = [f"=== prompt {i}, sample {s} ===\n{p}" + tokenizer.decode(t, skip_special_tokens=True)
              for (i, p), s, t in zip([(1, "to be")] * 2 + [(2, "the lazy")] * 2, [1, 2, 1, 2], tokens)]
    assert text == "\n".join(blocks) + "\n"
    assert tokens[0] != tokens[1], "two samples of one prompt should differ at temperature 0.8"


def test_prompt_file_gives_one_prompt_per_nonblank_line(hf_model, tmp_path):
    hf_dir, _, _, _ = hf_model
    f = tmp_path / "prompts.txt"
    f.write_text("the quick\n\nto be\n")
    text, tokens = run_cli(hf_dir, "--prompt_file", str(f), "--temperature", "0")
    assert len(tokens) == 2 and text.startswith("=== prompt 1 ===\nthe quick") and "=== prompt 2 ===\nto be" in text


def test_a_later_row_is_held_until_the_rows_before_it_are_done(hf_model):
    _, _, _, tokenizer = hf_model
    out = io.StringIO()
    a, b = tokenizer.encode(" fox"), tokenizer.encode(" dog")
    stream = OrderedStream(tokenizer, ["[0]", "[1]"], ["A", "B"], [2, 2], tokenizer.eos_id, out)
    stream(1, b[0])
    assert out.getvalue() == "[0]\nA", "row 1 must wait for row 0"
    stream(0, a[0])
    assert out.getvalue() == "[0]\nA" + tokenizer.decode(a[:1])
    stream(0, tokenizer.eos_id)  # row 0 done: row 1's buffered text follows at once
    assert out.getvalue() == "[0]\nA" + tokenizer.decode(a[:1]) + "\n[1]\nB" + tokenizer.decode(b[:1])


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-0.5"], "temperature=-0.5 must be >= 0"),
    (["--top_p", "0"], "top_p=0.0 must be in (0, 1]"),
    (["--top_p", "1.5"], "top_p=1.5 must be in (0, 1]"),
    (["--prompt", ""], "prompt 2 is empty"),
    (["--prompt", "the lazy dog " * 30], "prompt 2 has"),
    (["--num_samples", "0"], "--num_samples=0 must be >= 1"),
    (["--prompt_file", "/nonexistent/prompts.txt"], "--prompt_file /nonexistent/prompts.txt does not exist"),
])
def test_bad_arguments_exit_2_with_one_line(hf_model, capsys, args, message):
    hf_dir, _, _, _ = hf_model
    assert cli.main(["--hf_dir", hf_dir, "--prompt", "to be", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("launch.generate: error: ") and message in err and err.count("\n") == 1, err


def test_missing_hf_dir_exits_2_with_one_line(capsys, tmp_path):
    assert cli.main(["--hf_dir", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1, err
