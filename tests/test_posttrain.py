"""Post-training pieces on a tiny model: assistant-token masks, packing, the DPO loss against NumPy and TRL's
formula, LoRA against PEFT, and DPO on an MoE model with adapters."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from model_fixtures import init, jitted_apply, row_inputs, tiny_config
from ultrathink_jax.data.packing import pack_row
from ultrathink_jax.losses import cross_entropy
from ultrathink_jax.data.tokenizer import train_tokenizer
from ultrathink_jax.model import Transformer
from ultrathink_jax.posttrain import chat, dpo
from ultrathink_jax.posttrain import lora as lora_lib
from ultrathink_jax.posttrain.loop import make_objective

CONVERSATIONS = [
    [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on a mat"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a dog"},
     {"role": "assistant", "content": "ran"}, {"role": "user", "content": "where"},
     {"role": "assistant", "content": "to the park"}],
    [{"role": "user", "content": "birds"}, {"role": "assistant", "content": "sing in trees"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer(["the cat sat on a mat . a dog ran to the park . birds sing in trees . be brief where"] * 4,
                          300)
    assert chat.ensure_chat_template(tok) == [chat.IM_START, chat.IM_END]
    return tok


@pytest.fixture(scope="module")
def model():
    config = tiny_config(vocab_size=320, max_seq_len=128)
    return config, init(config)


def test_mask_covers_assistant_content_and_end_of_turn_only(tokenizer):
    ids, mask = chat.encode_conversation(tokenizer, CONVERSATIONS[1])
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "ran<|im_end|>\nto the park<|im_end|>\n"
    assert tokenizer.decode(ids) == chat.render(tokenizer, CONVERSATIONS[1])


def test_masked_tokens_get_zero_gradient(tokenizer, model):
    config, params = model
    stream = chat.chat_stream(CONVERSATIONS, tokenizer, config.vocab_size)
    row = pack_row(stream, 0, 128, tokenizer.pad_id)
    batch = {k: jnp.asarray(v[None]) for k, v in row.items()}
    objective = jax.jit(jax.grad(make_objective(config, None, "sft", 0.1), has_aux=True))
    grads, _ = objective(params, {}, batch, None)
    changed = dict(batch)  # different targets wherever the weight is 0: nothing may change
    changed["targets"] = jnp.where(batch["weights"] > 0, batch["targets"], (batch["targets"] + 7) % 300)
    assert int(jnp.sum(changed["targets"] != batch["targets"])) > 10
    grads2, _ = objective(params, {}, changed, None)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), grads, grads2))
    logits = jitted_apply(config)(params, batch["inputs"], batch["positions"], batch["segment_ids"])[0]
    g = jax.grad(lambda l: cross_entropy(l, batch["targets"], batch["weights"])[0])(logits)
    masked = np.asarray(batch["weights"][0]) == 0
    assert np.abs(np.asarray(g[0])[masked]).max() == 0.0 and np.abs(np.asarray(g[0])[~masked]).max() > 0


def test_packed_loss_equals_unpacked(tokenizer, model):
    config, params = model
    stream = chat.chat_stream(CONVERSATIONS, tokenizer, config.vocab_size)
    assert stream.n_tokens <= 128, "all conversations must fit one packed row"
    packed = pack_row(stream, 0, 128, tokenizer.pad_id)
    rows = [chat.sequence_row(*map(lambda x: x + [0], chat.encode_conversation(tokenizer, c)), 128, tokenizer.pad_id)
            for c in CONVERSATIONS]
    def loss(batch):
        logits = jitted_apply(config)(params, jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                                      jnp.asarray(batch["segment_ids"]))[0]
        return [float(x) for x in cross_entropy(logits, jnp.asarray(batch["targets"]), jnp.asarray(batch["weights"]))]

    p_sum, p_w = loss({k: v[None] for k, v in packed.items()})
    u_sum, u_w = loss({k: np.stack([r[k] for r in rows]) for k in packed})
    assert p_w == u_w == float(stream.target_mask.sum())
    assert abs(p_sum - u_sum) < 1e-4 * abs(u_sum), (p_sum, u_sum)


def _numpy_dpo(logits, ref_logits, targets, weights, beta):
    """Independent NumPy DPO loss and its analytic gradient w.r.t. the policy logits."""
    def logsoftmax(x):
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    lp, ref = logsoftmax(logits.astype(np.float64)), logsoftmax(ref_logits.astype(np.float64))
    take = lambda a: np.take_along_axis(a, targets[..., None], -1)[..., 0]
    pi, rf = (take(lp) * weights).sum(-1), (take(ref) * weights).sum(-1)
    z = beta * ((pi[0::2] - pi[1::2]) - (rf[0::2] - rf[1::2]))
    loss = np.mean(np.logaddexp(0, -z))
    dz = -1 / (1 + np.exp(z)) / len(z)  # d loss / d z
    dpi = np.zeros_like(pi)
    dpi[0::2], dpi[1::2] = beta * dz, -beta * dz
    onehot = np.eye(logits.shape[-1])[targets]
    grad = dpi[:, None, None] * weights[..., None] * (onehot - np.exp(lp))
    return loss, grad


def _trl_sigmoid_loss(pi_c, pi_r, ref_c, ref_r, beta):
    """TRL DPOTrainer.dpo_loss, loss_type="sigmoid", label_smoothing=0 (trl/trainer/dpo_trainer.py)."""
    logits = (pi_c - pi_r) - (ref_c - ref_r)
    return (-torch.nn.functional.logsigmoid(beta * logits)).mean()


def test_own_chat_template_is_kept_through_save_and_load(tmp_path):
    from ultrathink_jax.data import load_tokenizer

    tok = train_tokenizer(["hello there user assistant"] * 4, 280)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    loaded = load_tokenizer(tok.save(tmp_path))
    assert loaded.chat_template == tok.chat_template and chat.ensure_chat_template(loaded) == []
    ids, mask = chat.encode_conversation(loaded, [{"role": "user", "content": "hello"},
                                                  {"role": "assistant", "content": "there"}])
    assert loaded.decode(ids) == "user: hello\nassistant: there\n"
    assert loaded.decode([i for i, m in zip(ids, mask) if m]) == "assistant: there\n"


def test_dpo_loss_and_gradient_match_numpy_and_trl():
    rng = np.random.default_rng(0)
    B, T, V, beta = 6, 7, 11, 0.3
    logits, ref_logits = rng.normal(size=(B, T, V)).astype(np.float32), rng.normal(size=(B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    weights = (rng.random((B, T)) > 0.4).astype(np.float32)

    def loss_fn(l):
        return dpo.dpo_loss(dpo.sequence_logps(l, targets, weights), dpo.sequence_logps(ref_logits, targets, weights),
                            beta)
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(logits))
    np_loss, np_grad = _numpy_dpo(logits, ref_logits, targets, weights, beta)
    np.testing.assert_allclose(float(loss), np_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np_grad, atol=1e-6)

    t_logits = torch.tensor(logits, requires_grad=True)
    lp = torch.log_softmax(t_logits, -1).gather(-1, torch.tensor(targets, dtype=torch.long)[..., None])[..., 0]
    pi = (lp * torch.tensor(weights)).sum(-1)
    ref = (torch.log_softmax(torch.tensor(ref_logits), -1).gather(-1, torch.tensor(targets, dtype=torch.long)[..., None])
           [..., 0] * torch.tensor(weights)).sum(-1)
    t_loss = _trl_sigmoid_loss(pi[0::2], pi[1::2], ref[0::2], ref[1::2], beta)
    t_loss.backward()
    np.testing.assert_allclose(float(loss), float(t_loss.detach()), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), t_logits.grad.numpy(), atol=1e-6)
    chosen, rejected = beta * (pi[0::2] - ref[0::2]).detach(), beta * (pi[1::2] - ref[1::2]).detach()
    np.testing.assert_allclose(float(metrics["rewards/margin"]), float((chosen - rejected).mean()), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/accuracy"]), float((chosen > rejected).float().mean()))


def test_lora_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    import peft
    import transformers

    from ultrathink_jax.hf.export import export_params

    config = tiny_config()
    params = jax.device_get(init(config))
    lora = lora_lib.LoraConfig(4, 8.0, 0.0, tuple(lora_lib.TARGETS))
    adapters = lora_lib.init_adapters(params, lora, seed=1)
    adapters = jax.tree.map(lambda x: x + 0.05 * np.random.default_rng(2).normal(size=x.shape).astype(np.float32),
                            adapters)  # B != 0, so the adapters change the output
    export_params(params, config, tmp_path / "base")
    lora_lib.peft_adapter(adapters, lora, config, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, 12)).astype(np.int32)
    inputs = row_inputs(tokens)

    @functools.partial(jax.jit, static_argnums=(2, 3))
    def forward(adapters, seed, lora, training):
        return lora_lib.apply(Transformer(config), params, adapters, lora, *inputs, deterministic=not training,
                              rngs={"jitter": jax.random.PRNGKey(seed)} if training else None)[0]

    ours = np.asarray(forward(adapters, 0, lora, False))
    merged = np.asarray(jitted_apply(config)(lora_lib.merge(params, adapters, lora), *inputs)[0])
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    np.testing.assert_allclose(merged, ours, atol=1e-5)
    assert np.abs(ours - np.asarray(jitted_apply(config)(params, *inputs)[0])).max() > 1e-3
    # lora_dropout acts on the adapters' input while training only
    noisy = lora_lib.LoraConfig(4, 8.0, 0.5, tuple(lora_lib.TARGETS))
    train0, train1 = np.asarray(forward(adapters, 0, noisy, True)), np.asarray(forward(adapters, 1, noisy, True))
    assert np.abs(train0 - ours).max() > 1e-3 and np.abs(train0 - train1).max() > 1e-3
    np.testing.assert_allclose(np.asarray(forward(adapters, 0, noisy, False)), ours, atol=1e-6)


def test_dpo_with_lora_on_moe_starts_at_log2_and_trains_only_adapters(tokenizer):
    # (dense DPO with LoRA runs end to end in test_posttrain_e2e.py)
    config = tiny_config(vocab_size=320, n_experts=4, n_experts_per_tok=2, moe_d_ff=64)
    params = init(config)
    lora = lora_lib.LoraConfig(2, 4.0, 0.1, ("q", "v", "o"))
    adapters = lora_lib.init_adapters(params, lora)
    rows = [r for c, rj in (("sat on a mat", "ran"), ("to the park", "birds")) for r in
            chat.preference_rows(tokenizer, [{"role": "user", "content": "the cat"}], c, rj, 32)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    objective = make_objective(config, lora, "dpo", 0.1)
    (value, metrics), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
        adapters, {"base": params}, batch, jax.random.PRNGKey(0))
    # B = 0: the policy is the reference, so every pair's logit is 0 and the loss is log 2
    assert abs(float(metrics["loss"]) - math.log(2)) < 1e-5
    assert float(metrics["rewards/margin"]) == 0.0
    assert set(jax.tree.leaves(jax.tree.map(lambda g: g.shape, grads), is_leaf=lambda x: isinstance(x, tuple))) \
        == set(jax.tree.leaves(jax.tree.map(lambda a: a.shape, adapters), is_leaf=lambda x: isinstance(x, tuple)))
    assert float(optax_norm(grads)) > 0 and math.isfinite(float(value))
    assert float(metrics["moe_loss"]) > 0


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_growing_the_vocabulary_keeps_every_old_logit():
    from ultrathink_jax.posttrain.loop import resize_vocab

    config = tiny_config()  # untied: the embedding and lm_head both grow
    params = init(config)
    grown, bigger = resize_vocab(params, config, 192)
    assert bigger.vocab_size == 192 and grown["lm_head"]["kernel"].shape == (config.d_model, 192)
    np.testing.assert_allclose(grown["embed_tokens"]["embedding"][150], params["embed_tokens"]["embedding"].mean(0), rtol=1e-6)
    tokens = np.arange(20, dtype=np.int32)[None] % config.vocab_size
    old = jitted_apply(config)(params, *row_inputs(tokens))[0]
    new = jitted_apply(bigger)(grown, *row_inputs(tokens))[0]
    np.testing.assert_allclose(np.asarray(new[..., :config.vocab_size]), np.asarray(old), atol=1e-6)
