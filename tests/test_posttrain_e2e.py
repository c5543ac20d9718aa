"""End to end on a tiny model: HF import -> SFT (assistant-token loss falls) -> DPO with LoRA (held-out reward
accuracy and margin up, reference log-probs unchanged) -> export -> transformers generates with the chat
template; and the Constitutional AI pipeline writing files launch.sft / launch.dpo read."""

import json
import random

import numpy as np
import pytest
import torch

from test_train_fixtures import make_run_dir, tiny_config, write_corpus

WORDS = "the cat sat on a mat a dog ran to the park birds sing in trees".split()


def _conversations(rng, n):
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(3))
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": q + " ."}]})
    return rows


def _pairs(rng, n):
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(2))
        rows.append({"prompt": q, "chosen": "yes " + q, "rejected": "no " + q})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _post_config(init, train, eval_file, steps, **posttrain):
    from ultrathink_jax.configs import sft as sft_config

    config = sft_config.get_config()
    small = tiny_config(train, **{"model.max_seq_len": 64})
    config.model, config.data = small.model, small.data
    config.data.train_files, config.data.eval_files = train, eval_file
    config.data.seq_len, config.data.global_batch_size = 48, 8
    config.posttrain.init_from = str(init)
    for k, v in posttrain.items():
        config.posttrain[k] = v
    config.train.steps = steps
    config.optim.learning_rate, config.optim.warmup_steps = 1e-2, 2
    config.checkpoint.every_steps, config.log.every_steps = 100, 5
    config.log.progress, config.log.tensorboard = False, False
    return config


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from ultrathink_jax.hf.run import import_run
    from ultrathink_jax.posttrain.export import export_any_run
    from ultrathink_jax.posttrain.loop import fine_tune

    root = tmp_path_factory.mktemp("posttrain")
    rng = random.Random(0)
    train_txt, _ = write_corpus(root / "corpus")
    base_cfg = tiny_config(train_txt, **{"model.max_seq_len": 64})
    make_run_dir(root / "scratch", base_cfg)
    export_any_run(root / "scratch", root / "hf")  # a Hugging Face model to start from
    import_run(root / "hf", root / "imported", base_cfg)
    sft_train, sft_eval = _write(root / "sft.jsonl", _conversations(rng, 64)), _write(root / "sft_eval.jsonl", _conversations(rng, 8))
    sft = fine_tune(_post_config(root / "imported", sft_train, sft_eval, 30), root / "sft", "sft")
    dpo_train, dpo_eval = _write(root / "pairs.jsonl", _pairs(rng, 48)), _write(root / "pairs_eval.jsonl", _pairs(rng, 12))
    dpo_config = _post_config(root / "sft", dpo_train, dpo_eval, 20, lora_rank=4, lora_targets="q,v,o,up",
                              dpo_beta=0.5)
    first = fine_tune(dpo_config, root / "dpo", "dpo", until_step=12)  # stopped like a preempted job ...
    dpo = fine_tune(dpo_config, root / "dpo", "dpo")  # ... and resumed from its adapters-only checkpoint
    return root, sft, dpo, first


def test_dpo_with_full_fine_tuning_starts_at_log2(pipeline):
    from ultrathink_jax.posttrain.loop import fine_tune

    root = pipeline[0]
    config = _post_config(root / "sft", str(root / "pairs.jsonl"), "", 2)
    config.optim.warmup_steps = 1  # warmup must end before the 2-step run does
    result = fine_tune(config, root / "dpo_full", "dpo")
    assert abs(result.metrics[1]["loss"] - np.log(2)) < 1e-5  # the policy starts as the reference
    assert result.metrics[2]["loss"] < result.metrics[1]["loss"]


def test_sft_loss_on_assistant_tokens_falls(pipeline):
    _, sft, _, _ = pipeline
    first, last = np.mean([sft.losses[s] for s in (1, 2, 3)]), np.mean([sft.losses[s] for s in (28, 29, 30)])
    assert last < 0.6 * first, (first, last)  # 30 steps from a random tiny model: about 0.5x (init-dependent)
    assert sft.metrics[1]["tokens"] < 8 * 48 * 0.8  # only assistant tokens are counted (prompts are masked)


def test_dpo_learns_held_out_preferences_and_keeps_the_reference(pipeline):
    from ultrathink_jax import sharding
    from ultrathink_jax.data import load_tokenizer
    from ultrathink_jax.posttrain import chat
    from ultrathink_jax.posttrain.loop import PreferenceBatches, evaluate_held_out, load_model
    from ultrathink_jax.train import run as run_lib

    root, _, dpo, first = pipeline
    assert (first.start_step, first.final_step, dpo.start_step, dpo.final_step) == (0, 12, 12, 20)
    # LoRA checkpoints hold the adapters and their optimizer state only, not the frozen base
    for item in ("params", "opt_state"):
        saved = json.loads((root / "dpo" / "checkpoints" / "20" / item / "_METADATA").read_text())["tree_metadata"]
        names = {k for key in saved for k in ("lora_a", "lora_b", "kernel", "embedding", "scale") if f"'{k}'" in key}
        assert names == {"lora_a", "lora_b"}, (item, names)
    assert dpo.evals["rewards/accuracy"] > 0.5 and dpo.evals["rewards/margin"] > 0.1, dpo.evals
    # the reference is the SFT model: its log-probs on the held-out pairs, measured apart, are what DPO reports
    mesh = sharding.make_mesh({"fsdp": -1})
    model, params, tokenizer, _ = load_model(root / "sft", mesh=mesh)
    config = run_lib.load_config(root / "dpo")
    batches = PreferenceBatches(chat.read_preferences(str(root / "pairs_eval.jsonl")), tokenizer, config.data, False)
    with sharding.activate(mesh):
        sft_logps = evaluate_held_out(model, None, "dpo", config, params, {"reference": params}, batches, mesh)
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(dpo.evals[f"logps/ref_{side}"], sft_logps[f"logps/{side}"], rtol=1e-5)
        np.testing.assert_allclose(sft_logps[f"logps/ref_{side}"], sft_logps[f"logps/{side}"], rtol=1e-6)
    assert load_tokenizer(root / "dpo" / "tokenizer").chat_template == chat.DEFAULT_TEMPLATE


def test_export_loads_in_transformers_and_generates_with_the_chat_template(pipeline):
    import transformers

    from launch import export_hf
    from ultrathink_jax.generate import generate
    from ultrathink_jax.posttrain import chat
    from ultrathink_jax.posttrain.loop import load_model

    root, _, _, _ = pipeline
    assert export_hf.main([f"--workdir={root / 'dpo'}", f"--out={root / 'dpo_hf'}"]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(root / "dpo_hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "dpo_hf", dtype=torch.float32)
    messages = [{"role": "user", "content": "the cat"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    ours_model, params, tokenizer, _ = load_model(root / "dpo")
    assert ids[0].tolist() == chat.prompt_ids(tokenizer, messages)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_id)
    ours = generate(params, ours_model, [ids[0].tolist()], 6)[0]
    assert out[0, ids.shape[1]:].tolist() == ours

    # the PEFT adapter of the same run, loaded onto the export of the run it started from, is the same model
    import peft

    assert export_hf.main([f"--workdir={root / 'dpo'}", f"--out={root / 'dpo_peft'}", "--peft"]) == 0
    assert export_hf.main([f"--workdir={root / 'sft'}", f"--out={root / 'sft_hf'}"]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "sft_hf", dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, root / "dpo_peft").eval()
    with torch.no_grad():
        np.testing.assert_allclose(adapted(ids).logits.numpy(), model(ids).logits.numpy(), atol=1e-5)


def test_constitutional_pipeline_writes_files_sft_and_dpo_read(pipeline, capsys):
    from launch import constitutional
    from ultrathink_jax.posttrain import chat

    root, _, _, _ = pipeline
    prompts = root / "prompts.txt"
    prompts.write_text("the cat\na dog ran\nbirds sing\n")
    for mode in ("revision", "feedback"):
        out = root / f"cai_{mode}"
        assert constitutional.main([f"--workdir={root / 'dpo'}", "--principles=examples/constitutional/principles.jsonl",
                                    f"--prompts={prompts}", f"--out={out}", f"--mode={mode}",
                                    "--max_new_tokens=8"]) == 0
        sft = chat.read_conversations(str(out / "sft.jsonl"))
        pairs = chat.read_preferences(str(out / "pairs.jsonl"))
        trace = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
        assert len(sft) == len(pairs) == len(trace) == 3
        assert [m["role"] for m in sft[0]] == ["user", "assistant"] and sft[0][0]["content"] == "the cat"
        assert all(t["principle"] and "critique" in t and "revision" in t for t in trace)
        if mode == "revision":
            assert all(p[1] == t["revision"] and p[2] == t["answer"] for p, t in zip(pairs, trace))
        else:
            assert all(t["preferred"] in "AB" and np.isfinite(t["logp_a"]) for t in trace)
            assert all(p[1] == (t["sample_a"] if t["preferred"] == "A" else t["sample_b"]) for p, t in zip(pairs, trace))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from launch import constitutional, dpo, sft

    assert sft.main([f"--workdir={tmp_path / 'x'}", "--data=a.jsonl"]) == 2
    assert capsys.readouterr().err.strip() == ("launch.sft: error: config: posttrain.init_from is empty; pass "
                                               "--init=RUN (a run to fine-tune)")
    assert dpo.main([f"--workdir={tmp_path / 'x'}", f"--init={tmp_path / 'missing'}", "--data=a.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("launch.dpo: error: ") and err.count("\n") == 1
    bad = tmp_path / "principles.jsonl"
    bad.write_text('{"name": "x"}\n')
    assert constitutional.main([f"--hf_dir={tmp_path}", f"--principles={bad}", f"--prompts={bad}",
                                f"--out={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("launch.constitutional: error: ") and "needs string fields" in err and err.count("\n") == 1
