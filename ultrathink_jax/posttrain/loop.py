"""Post-training runs (SFT and DPO): start from another run's weights, train with the trainer's pieces.

A post-training workdir is a run directory like launch.train's (config.json, model_config.json, tokenizer/,
checkpoints/, tensorboard/), so launch.eval / generate / export_hf read it. What its checkpoints hold:
  full fine-tuning: the model params and their AdamW state (load_run reads it as any run);
  LoRA: only the adapters and *their* optimizer state; the frozen base is `posttrain.init_from`'s weights,
        re-read on resume and export (`load_model` merges the two).
The step is pure and jitted with explicit shardings; the trainable state is donated, the frozen tree (LoRA base
or DPO reference) is an argument like the batch. DPO's reference log-probs are computed on the fly from the
frozen weights: the starting params (full fine-tuning) or the base with adapters off (LoRA).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ultrathink_jax import losses, sharding
from ultrathink_jax import metrics as metrics_lib
from ultrathink_jax.checkpoint import abstract_like
from ultrathink_jax.config import ConfigError, ModelConfig
from ultrathink_jax.data import DataError, EvalBatches, TrainIterator, load_tokenizer
from ultrathink_jax.data.pipeline import TOKENIZER_DIR
from ultrathink_jax.model import Transformer
from ultrathink_jax.moe import moe_loss
from ultrathink_jax.params import param_shardings
from ultrathink_jax.posttrain import chat, dpo
from ultrathink_jax.posttrain import config as pt_config
from ultrathink_jax.posttrain import lora as lora_lib
from ultrathink_jax.train import TrainingError, evaluate
from ultrathink_jax.train import run as run_lib
from ultrathink_jax.train.config import VOCAB_MULTIPLE
from ultrathink_jax.train.config import validate as validate_trainer
from ultrathink_jax.train.optim import make_optimizer
from ultrathink_jax.train.state import TrainState, initial_rng, state_shardings, step_rng
from ultrathink_jax.train.steps import batch_shardings, global_batch

OBJECTIVES = ("sft", "dpo")


# ----------------------------------------------------------------------------------------------- models

def lora_config(config: ml_collections.ConfigDict) -> lora_lib.LoraConfig | None:
    p = config.get("posttrain")
    if p is None or not p.lora_rank:
        return None
    return lora_lib.LoraConfig.from_text(p.lora_rank, p.lora_alpha, p.lora_dropout, p.lora_targets)


def resize_vocab(params, model: ModelConfig, vocab_size: int):
    """Grows the embedding (and an untied lm_head) to `vocab_size` rows; new rows start at the mean embedding
    (a neutral start for added special tokens)."""
    if vocab_size <= model.vocab_size:
        return params, model
    emb = params["embed_tokens"]["embedding"]
    extra = vocab_size - model.vocab_size
    params = {**params, "embed_tokens": {"embedding": jnp.concatenate(
        [emb, jnp.broadcast_to(jnp.mean(emb, axis=0), (extra, emb.shape[1]))])}}
    if not model.tie_embeddings:
        head = params["lm_head"]["kernel"]
        params["lm_head"] = {"kernel": jnp.concatenate([head, jnp.broadcast_to(jnp.mean(head, axis=1, keepdims=True),
                                                                               (head.shape[0], extra))], axis=1)}
    return params, dataclasses.replace(model, vocab_size=vocab_size)


def load_model(workdir: str | os.PathLike, step: int | None = None, mesh=None):
    """(ModelConfig, plain params, tokenizer, config) of any run: a LoRA run's adapters are merged into its
    base (`posttrain.init_from`, itself any run)."""
    config = run_lib.load_config(workdir)
    lora = lora_config(config)
    if lora is None:
        return run_lib.load_run(workdir, step, mesh)
    base_model, base, adapters, tokenizer = load_lora_parts(workdir, config, lora, step, mesh)
    return run_lib.LoadedRun(base_model, lora_lib.merge(base, adapters, lora), tokenizer, config)


def load_lora_parts(workdir, config, lora, step=None, mesh=None):
    """(model, frozen base params on `mesh`, adapters, tokenizer) of a LoRA run."""
    mesh = mesh or sharding.make_mesh({"fsdp": -1})
    model = run_lib.saved_model_config(workdir)
    base = start_params(config, model, mesh)
    store = run_lib.checkpoints(workdir, read_only=True)
    try:
        target = jax.eval_shape(lambda: lora_lib.init_adapters(base, lora))
        replicated = NamedSharding(mesh, PartitionSpec())
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), target)
        _, adapters = store.restore_params(step, target)
    finally:
        store.close()
    return model, base, adapters, load_tokenizer(Path(workdir) / TOKENIZER_DIR)


def start_params(config, model: ModelConfig, mesh):
    """The starting run's params, grown to `model.vocab_size` if this run added chat tokens."""
    p = config.posttrain
    start = load_model(p.init_from, None, mesh)
    params, grown = resize_vocab(start.params, start.model_config, model.vocab_size)
    if dataclasses.replace(grown, **_training_fields(model)) != model:
        raise ConfigError(f"run {p.init_from} holds a different model than this run's model_config.json")
    return jax.device_put(params, param_shardings(model, mesh))


def _training_fields(model: ModelConfig) -> dict:
    from ultrathink_jax.hf.run import TRAINING_ONLY_FIELDS

    return {f: getattr(model, f) for f in TRAINING_ONLY_FIELDS}


# ----------------------------------------------------------------------------------------------- data

class PreferenceBatches:
    """DPO rows, interleaved chosen/rejected: `shuffle` = endless seeded epochs (state = batches served), else one
    ordered pass whose last batch is padded by repeating pairs (`n_real` says how many rows are real)."""

    def __init__(self, pairs, tokenizer, cfg: ml_collections.ConfigDict, shuffle: bool):
        rows = [r for p, c, rj in pairs for r in chat.preference_rows(tokenizer, p, c, rj, cfg.seq_len)]
        self.rows = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        self.n_pairs, self.pairs_per_batch, self.shuffle, self.seed = len(pairs), cfg.global_batch_size, shuffle, cfg.seed
        self.served = 0
        self.stats = {"documents": self.n_pairs, "tokens": int(self.rows["segment_ids"].astype(bool).sum())}

    def _batch(self, pair_ids: np.ndarray) -> dict:
        rows = np.stack([2 * pair_ids, 2 * pair_ids + 1], axis=1).reshape(-1)
        return {k: v[rows] for k, v in self.rows.items()}

    def __next__(self) -> dict:
        p = self.pairs_per_batch
        start = self.served * p
        order = np.concatenate([np.random.default_rng([self.seed, e]).permutation(self.n_pairs)
                                for e in range(start // self.n_pairs, (start + p - 1) // self.n_pairs + 1)])
        offset = start - (start // self.n_pairs) * self.n_pairs
        self.served += 1
        return self._batch(order[offset:offset + p])

    def __iter__(self):
        if self.shuffle:
            return self
        return self._ordered()

    def _ordered(self):
        p = self.pairs_per_batch
        for start in range(0, self.n_pairs, p):
            ids = np.arange(start, start + p) % self.n_pairs
            yield self._batch(ids), 2 * min(p, self.n_pairs - start)

    def get_state(self) -> dict:
        return {"served": self.served, "pairs": self.n_pairs}

    def set_state(self, state: dict) -> None:
        if state.get("pairs") != self.n_pairs:
            raise DataError(f"data iterator state was saved for {state.get('pairs')} pairs, this run has "
                            f"{self.n_pairs}")
        self.served = int(state["served"])


def sft_batches(files: str, tokenizer, cfg, vocab_size: int, train: bool):
    stream = chat.chat_stream(chat.read_conversations(files), tokenizer, vocab_size)
    stats = {"documents": stream.n_documents, "tokens": stream.n_tokens,
             "targets": int(stream.target_mask.sum())}
    if train:
        return TrainIterator(stream, stats, cfg, tokenizer.pad_id, 0, 1)
    return EvalBatches(stream, stats, cfg, tokenizer.pad_id, 0, 1)


# ----------------------------------------------------------------------------------------------- steps

def make_forward(model: ModelConfig, lora: lora_lib.LoraConfig | None):
    """forward(trainable, frozen, batch, rng|None) -> (logits, aux): the policy, adapters on if LoRA."""
    net = Transformer(model)

    def forward(trainable, frozen, batch, rng=None):
        base, adapters = (frozen["base"], trainable) if lora else (trainable, None)
        args = (batch["inputs"], batch["positions"], batch["segment_ids"])
        train = rng is not None
        logits, aux, _ = lora_lib.apply(net, base, adapters, lora, *args, deterministic=not train,
                                        rngs={"jitter": rng} if train else None)
        return logits, aux

    def reference(trainable, frozen, batch):
        params = frozen["base"] if lora else frozen["reference"]
        logits, _, _ = net.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
        return jax.lax.stop_gradient(logits)

    return forward, reference


def make_objective(model: ModelConfig, lora, objective: str, beta: float) -> Callable:
    """objective(trainable, frozen, batch, rng) -> (scalar to minimise, metrics)."""
    forward, reference = make_forward(model, lora)

    def sft(trainable, frozen, batch, rng):
        logits, aux = forward(trainable, frozen, batch, rng)
        ce_sum, weight_sum = losses.cross_entropy(logits, batch["targets"], batch["weights"])
        loss = ce_sum / jnp.maximum(weight_sum, 1.0)  # mean over assistant tokens
        value, metrics = loss, {"loss": loss, "tokens": weight_sum}
        if "moe" in aux:
            metrics["moe_loss"] = moe_loss(aux["moe"], model)
            value = value + metrics["moe_loss"]
        return value, metrics

    def preference(trainable, frozen, batch, rng):
        logits, aux = forward(trainable, frozen, batch, rng)
        pi = dpo.sequence_logps(logits, batch["targets"], batch["weights"])
        ref = dpo.sequence_logps(reference(trainable, frozen, batch), batch["targets"], batch["weights"])
        value, metrics = dpo.dpo_loss(pi, ref, beta)
        metrics["tokens"] = jnp.sum(batch["weights"])
        if "moe" in aux:
            metrics["moe_loss"] = moe_loss(aux["moe"], model)
            value = value + metrics["moe_loss"]
        return value, metrics

    return {"sft": sft, "dpo": preference}[objective]


def make_train_step(objective_fn, tx, schedule):
    grad_fn = jax.grad(objective_fn, has_aux=True)

    def train_step(state: TrainState, frozen, batch):
        rng = step_rng(state)
        grads, metrics = grad_fn(state.params, frozen, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1, rng=state.rng), metrics

    return train_step


def _shardings(model, lora, tx, mesh, trainable_abstract):
    if lora is None:
        return state_shardings(model, tx, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())  # adapters are small: every device holds them whole
    abstract = TrainState(params=trainable_abstract, opt_state=jax.eval_shape(tx.init, trainable_abstract),
                          step=jax.ShapeDtypeStruct((), jnp.int32), rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    return jax.tree.map(lambda _: replicated, abstract)


# ----------------------------------------------------------------------------------------------- the run

@dataclasses.dataclass
class PostTrainResult:
    start_step: int
    final_step: int
    losses: dict[int, float]  # step -> training loss
    metrics: dict[int, dict]  # step -> every logged training metric
    evals: dict[str, float]  # final held-out metrics (SFT: loss; DPO: loss, rewards/*, logps/*)
    seconds: float
    params: object = dataclasses.field(default=None, repr=False)  # trainable tree (model params or adapters)


def prepare(config, workdir, mesh):
    """Model, tokenizer (with a chat template), frozen and trainable trees for a new or resumed run."""
    workdir = Path(workdir)
    start = load_model(config.posttrain.init_from, None, mesh)
    saved_tokenizer = workdir / TOKENIZER_DIR
    if (saved_tokenizer / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(saved_tokenizer)
    else:
        tokenizer = start.tokenizer
        chat.ensure_chat_template(tokenizer)
    params, model = start.params, start.model_config
    if tokenizer.vocab_size > model.vocab_size:  # the default template's tokens did not fit: grow the embedding
        params, model = resize_vocab(params, model, -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
    params = jax.device_put(params, param_shardings(model, mesh))
    return model, tokenizer, params


def fine_tune(config: ml_collections.ConfigDict, workdir: str | os.PathLike, objective: str,
              out: TextIO | None = None, until_step: int | None = None) -> PostTrainResult:
    """Trains `objective` ("sft" or "dpo") to `config.train.steps` (or stops after `until_step`, checkpointing
    there, as a preempted job would), resuming from the workdir's latest checkpoint; evaluates at the end."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} not in {OBJECTIVES}")
    out = out or sys.stderr
    pt_config.validate(config)
    validate_trainer(config)
    workdir = Path(workdir)
    mesh = run_lib.run_mesh(config)
    lora = lora_config(config)
    model, tokenizer, params = prepare(config, workdir, mesh)
    config = ml_collections.ConfigDict(config.to_dict())
    config.model = ml_collections.ConfigDict(dataclasses.asdict(model))
    run_lib.check_same_shapes(workdir, model)

    cfg_d = config.data
    rows, dp = cfg_d.global_batch_size * (2 if objective == "dpo" else 1), sharding.data_parallel_size(mesh)
    if rows % dp:
        raise ConfigError(f"config: data.global_batch_size={cfg_d.global_batch_size} gives {rows} rows per step, "
                          f"not divisible by the {dp} data-parallel devices (mesh data x fsdp x expert)")
    if objective == "sft":
        train_iter = sft_batches(cfg_d.train_files, tokenizer, cfg_d, model.vocab_size, train=True)
        eval_batches = (sft_batches(cfg_d.eval_files, tokenizer, cfg_d, model.vocab_size, train=False)
                        if cfg_d.eval_files else None)
    else:
        train_iter = PreferenceBatches(chat.read_preferences(cfg_d.train_files), tokenizer, cfg_d, shuffle=True)
        eval_batches = (PreferenceBatches(chat.read_preferences(cfg_d.eval_files), tokenizer, cfg_d, shuffle=False)
                        if cfg_d.eval_files else None)

    if lora:
        frozen, trainable = {"base": params}, lora_lib.init_adapters(params, lora, config.train.seed)
    else:
        # the reference gets buffers of its own: the trainable params are donated to each step
        frozen = {"reference": jax.tree.map(lambda x: x.copy(), params)} if objective == "dpo" else {}
        trainable = params
    total = config.train.steps
    tx, schedule = make_optimizer(config.optim, total)
    shardings = _shardings(model, lora, tx, mesh, jax.eval_shape(lambda: trainable))
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    objective_fn = make_objective(model, lora, objective, config.posttrain.dpo_beta)
    replicated = NamedSharding(mesh, PartitionSpec())
    step_fn = jax.jit(make_train_step(objective_fn, tx, schedule),
                      in_shardings=(shardings, frozen_shardings, batch_shardings(mesh)),
                      out_shardings=(shardings, replicated), donate_argnums=(0,))

    store = run_lib.checkpoints(workdir, config)
    progress = metrics_lib.Progress(total, enabled=jax.process_index() == 0, bar=config.log.progress, stream=out)
    writer = None
    try:
        with sharding.activate(mesh):
            state = TrainState(params=jax.device_put(trainable, shardings.params),
                               opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(trainable),
                               step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
                               rng=jax.device_put(initial_rng(config.train.seed), shardings.rng))
            if store.latest_step() is not None:  # the newest intact checkpoint; damaged ones are skipped
                target = abstract_like(state, shardings)
                latest, p, o, prog, data_state = store.restore(None, target.params, target.opt_state,
                                                               {"step": target.step, "rng": target.rng})
                train_iter.set_state(data_state)
                state = TrainState(params=p, opt_state=o, step=prog["step"], rng=prog["rng"])
                progress.message(f"resumed from checkpoint step {latest} in {store.directory}")
            run_lib.write_run_files(workdir, config, model)
            tokenizer.save(workdir / TOKENIZER_DIR)
            writer = metrics_lib.Writer(workdir / "tensorboard", enabled=config.log.tensorboard)
            what = f"LoRA rank {lora.rank} on {','.join(lora.targets)}" if lora else "full fine-tuning"
            progress.message(f"{objective}: {what}; train data {train_iter.stats}")
            end = total if until_step is None else min(total, until_step)
            result = _loop(config, state, frozen, step_fn, store, writer, progress, train_iter, end, mesh)
            if eval_batches is not None:
                result.evals = evaluate_held_out(model, lora,
                                                 objective, config, result.params, frozen, eval_batches, mesh)
                writer.scalars(result.final_step, {f"eval/{k}": v for k, v in result.evals.items()})
                progress.message("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in result.evals.items()))
        store.wait()
        return result
    finally:
        progress.close()
        if writer is not None:
            writer.close()
        store.close()


def _loop(config, state, frozen, step_fn, store, writer, progress, train_iter, end, mesh) -> PostTrainResult:
    step = int(jax.device_get(state.step))
    result = PostTrainResult(step, step, {}, {}, {}, 0.0)
    t0 = time.perf_counter()
    window_t, window_tokens = time.perf_counter(), 0.0
    while step < end:
        batch = global_batch(next(train_iter), mesh)
        state, m = step_fn(state, frozen, batch)
        step += 1
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            good = store.latest_step()
            raise TrainingError(f"non-finite loss {m['loss']} (grad norm {m['grad_norm']}) at step {step}; last "
                                f"good checkpoint: {'none' if good is None else f'step {good}'} in {store.directory}")
        result.losses[step] = m["loss"]
        result.metrics[step] = m
        window_tokens += m["tokens"]
        if step % config.log.every_steps == 0 or step == end:
            seconds = time.perf_counter() - window_t
            writer.scalars(step, {f"train/{k}": v for k, v in m.items()}
                           | {"perf/tokens_per_second": window_tokens / max(seconds, 1e-9)})
            rate = window_tokens / max(seconds, 1e-9)
            progress.update(step, m["loss"], rate, (end - step) * seconds / config.log.every_steps)
            window_t, window_tokens = time.perf_counter(), 0.0
        if step % config.checkpoint.every_steps == 0 or step == end:
            store.save(step, state.params, state.opt_state, {"step": state.step, "rng": state.rng},
                       train_iter.get_state())
    result.final_step, result.seconds, result.params = step, time.perf_counter() - t0, state.params
    return result


def evaluate_held_out(model, lora, objective, config, trainable, frozen, batches, mesh) -> dict:
    forward, reference = make_forward(model, lora)
    if objective == "sft":
        def eval_step(params, batch):
            logits, _ = forward(params, frozen, batch)
            return losses.cross_entropy(logits, batch["targets"], batch["weights"])

        loss, n = evaluate(jax.jit(eval_step), trainable, batches, mesh)
        return {"loss": loss, "tokens": n}

    @jax.jit
    def logps(params, batch):
        logits, _ = forward(params, frozen, batch)
        ref = reference(params, frozen, batch)
        return (dpo.sequence_logps(logits, batch["targets"], batch["weights"]),
                dpo.sequence_logps(ref, batch["targets"], batch["weights"]))

    pi, ref = [], []
    for batch, n_real in batches:
        p, r = jax.device_get(logps(trainable, global_batch(batch, mesh)))
        pi.append(p[:n_real])
        ref.append(r[:n_real])
    return dpo_metrics(np.concatenate(pi), np.concatenate(ref), config.posttrain.dpo_beta)


def dpo_metrics(pi: np.ndarray, ref: np.ndarray, beta: float) -> dict:
    """Held-out DPO metrics from interleaved per-row log-prob sums (float64 on the host)."""
    pi, ref = pi.astype(np.float64), ref.astype(np.float64)
    chosen, rejected = beta * (pi[0::2] - ref[0::2]), beta * (pi[1::2] - ref[1::2])
    z = chosen - rejected
    return {"loss": float(np.mean(np.logaddexp(0.0, -z))), "rewards/margin": float(np.mean(z)),
            "rewards/accuracy": float(np.mean(chosen > rejected)), "logps/chosen": float(np.mean(pi[0::2])),
            "logps/rejected": float(np.mean(pi[1::2])), "logps/ref_chosen": float(np.mean(ref[0::2])),
            "logps/ref_rejected": float(np.mean(ref[1::2]))}
