"""Constitutional AI data (Bai et al. 2022): the model critiques and revises its own answers against principles,
and labels preference pairs itself (AI feedback).

Per prompt: the model answers; a principle is drawn (seeded); the model writes a critique of its answer for that
principle's critique request, then a revision for its revision request. Each request is one user turn of a
conversation that continues the previous turns, preceded by the few-shot examples of the templates file, so the
model sees worked critiques/revisions before its own. Outputs, in `out`:
  sft.jsonl       {"messages": [user prompt, assistant revision]}            -> launch.sft
  pairs.jsonl     {"prompt", "chosen", "rejected"}                           -> launch.dpo
                  mode "revision": the revision preferred over the first answer;
                  mode "feedback": two sampled answers, the preferred one chosen by the model: the comparison
                  template asks which answer better follows a principle, and the option whose label ("A"/"B")
                  has the higher log-likelihood after the question wins.
  trace.jsonl     every intermediate text (answer, principle, critique, revision / samples and label log-probs)

Files: principles jsonl {"name", "critique", "revision", "comparison"}; prompts: one per line (.txt) or jsonl with
"prompt"; templates JSON {"critique", "revision", "comparison": format strings, "few_shot": [examples]} (the
default: ultrathink_jax/assets/constitutional/templates.json; example principles and prompts: examples/constitutional/).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from ultrathink_jax.config import ModelConfig
from ultrathink_jax.data.errors import DataError, DataFileNotFoundError
from ultrathink_jax.data.sources import read_utf8_file
from ultrathink_jax.data.tokenizer import Tokenizer
from ultrathink_jax.posttrain import chat, dpo
from ultrathink_jax.posttrain.chat import sequence_row

MODES = ("revision", "feedback")
PRINCIPLE_FIELDS = ("name", "critique", "revision", "comparison")
TEMPLATE_FIELDS = ("critique", "revision", "comparison", "few_shot")
EXAMPLE_FIELDS = ("prompt", "response", "critique_request", "critique", "revision_request", "revision")


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str = "revision"
    max_new_tokens: int = 64
    temperature: float = 0.7
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise DataError(f"--mode={self.mode!r} must be one of {MODES}")
        if self.max_new_tokens < 1:
            raise DataError(f"--max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise DataError(f"--temperature={self.temperature} must be >= 0")
        if self.mode == "feedback" and self.temperature == 0:
            raise DataError("--mode=feedback samples two different answers: --temperature must be > 0")


def _read(path) -> str:
    p = Path(path)
    if not p.is_file():
        raise DataFileNotFoundError(f"file does not exist: {p}")
    return read_utf8_file(p)[0]


def read_principles(path) -> list[dict]:
    out = []
    for where, row in chat.jsonl_objects(path):
        if any(not isinstance(row.get(f), str) for f in PRINCIPLE_FIELDS):
            raise DataError(f"{where}: a principle needs string fields {PRINCIPLE_FIELDS}")
        out.append(row)
    if not out:
        raise DataError(f"no principles in {path}")
    return out


def read_prompts(path) -> list[str]:
    if str(path).endswith(".jsonl"):
        prompts = []
        for where, row in chat.jsonl_objects(path):
            if not isinstance(row.get("prompt"), str):
                raise DataError(f"{where}: expected an object with a string 'prompt'")
            prompts.append(row["prompt"])
    else:
        prompts = [line.strip() for line in _read(path).splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"no prompts in {path}")
    return prompts


def read_templates(path) -> dict:
    try:
        t = json.loads(_read(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(t, dict) or any(f not in t for f in TEMPLATE_FIELDS):
        raise DataError(f"{path}: templates need the fields {TEMPLATE_FIELDS}")
    for ex in t["few_shot"]:
        if not isinstance(ex, dict) or any(not isinstance(ex.get(f), str) for f in EXAMPLE_FIELDS):
            raise DataError(f"{path}: each few_shot example needs string fields {EXAMPLE_FIELDS}")
    try:  # fail on a misspelt placeholder now, not after the first generation
        t["critique"].format(request="")
        t["revision"].format(request="")
        t["comparison"].format(prompt="", a="", b="", comparison="")
    except (KeyError, IndexError, AttributeError) as e:
        raise DataError(f"{path}: template placeholder {e} is unknown") from None
    return t


def _few_shot(templates: dict) -> list[dict]:
    """The worked examples as earlier turns of the conversation."""
    turns = []
    for ex in templates["few_shot"]:
        turns += [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["response"]},
                  {"role": "user", "content": templates["critique"].format(request=ex["critique_request"])},
                  {"role": "assistant", "content": ex["critique"]},
                  {"role": "user", "content": templates["revision"].format(request=ex["revision_request"])},
                  {"role": "assistant", "content": ex["revision"]}]
    return turns


class Model:
    """Generation and scoring with one model (params on one device mesh)."""

    def __init__(self, params, config: ModelConfig, tokenizer: Tokenizer, settings: Settings):
        from ultrathink_jax.generate import Engine

        self.config, self.tokenizer, self.settings = config, tokenizer, settings
        self.engine = Engine(params, config)
        self.eos = chat.end_of_turn_id(tokenizer)
        self.truncated = 0
        self.calls = 0

    def _prompt(self, messages) -> list[int]:
        ids = chat.prompt_ids(self.tokenizer, messages)
        room = self.config.max_seq_len - self.settings.max_new_tokens
        if room < 1:
            raise DataError(f"--max_new_tokens={self.settings.max_new_tokens} leaves no room in the model's "
                            f"context of {self.config.max_seq_len} tokens")
        if len(ids) > room:  # keep the end: the latest request and the generation prompt
            self.truncated += 1
            ids = ids[-room:]
        return ids

    def answer(self, conversations: Sequence[Sequence[dict]], temperature: float | None = None) -> list[str]:
        from ultrathink_jax.generate.sampling import SamplingConfig

        s = self.settings
        t = s.temperature if temperature is None else temperature
        self.calls += 1
        new = self.engine.generate([self._prompt(m) for m in conversations], s.max_new_tokens,
                                   SamplingConfig(temperature=t), eos_id=self.eos, seed=s.seed + self.calls)
        return [self.tokenizer.decode([i for i in ids if i != self.eos], skip_special_tokens=True).strip()
                for ids in new]

    def option_logps(self, question: Sequence[dict], options: Sequence[str]) -> list[float]:
        """log p(option | question as a user turn, assistant generation prompt), summed over the option tokens."""
        prompt = self._prompt(question)
        rows = []
        for option in options:
            ids = self.tokenizer.encode(option)
            full = prompt + ids
            full = full[-self.config.max_seq_len:]
            mask = [0] * (len(full) - len(ids)) + [1] * len(ids)
            rows.append(sequence_row(full, mask, self.config.max_seq_len, self.tokenizer.pad_id))
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        logits = _forward(self.config)(self.engine.params, batch["inputs"], batch["positions"], batch["segment_ids"])
        return [float(x) for x in jax.device_get(dpo.sequence_logps(logits, batch["targets"], batch["weights"]))]


@functools.lru_cache(maxsize=None)
def _forward(config: ModelConfig):
    from ultrathink_jax.model import Transformer

    return jax.jit(lambda p, t, pos, seg: Transformer(config).apply({"params": p}, t, pos, seg)[0])


def run(model: Model, principles: list[dict], prompts: list[str], templates: dict, out_dir) -> dict:
    """Writes sft.jsonl, pairs.jsonl, trace.jsonl into `out_dir`; returns counts."""
    s = model.settings
    rng = random.Random(s.seed)
    few = _few_shot(templates)
    chosen_principles = [rng.choice(principles) for _ in prompts]
    asks = [[{"role": "user", "content": p}] for p in prompts]
    answers = model.answer(asks)
    critique_turns = [few + a + [{"role": "assistant", "content": ans},
                                 {"role": "user", "content": templates["critique"].format(request=pr["critique"])}]
                      for a, ans, pr in zip(asks, answers, chosen_principles)]
    critiques = model.answer(critique_turns)
    revision_turns = [c + [{"role": "assistant", "content": crit},
                           {"role": "user", "content": templates["revision"].format(request=pr["revision"])}]
                      for c, crit, pr in zip(critique_turns, critiques, chosen_principles)]
    revisions = model.answer(revision_turns)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trace, sft, pairs = [], [], []
    for p, pr, ans, crit, rev in zip(prompts, chosen_principles, answers, critiques, revisions):
        trace.append({"prompt": p, "principle": pr["name"], "answer": ans, "critique": crit, "revision": rev})
        sft.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": rev}]})
        if s.mode == "revision":
            pairs.append({"prompt": p, "chosen": rev, "rejected": ans})
    if s.mode == "feedback":
        first, second = model.answer(asks), model.answer(asks)
        for i, (p, pr, a, b) in enumerate(zip(prompts, chosen_principles, first, second)):
            question = [{"role": "user", "content": templates["comparison"].format(
                prompt=p, a=a, b=b, comparison=pr["comparison"])}]
            lp_a, lp_b = model.option_logps(question, ["(A)", "(B)"])
            chosen, rejected = (a, b) if lp_a >= lp_b else (b, a)
            pairs.append({"prompt": p, "chosen": chosen, "rejected": rejected})
            trace[i].update({"sample_a": a, "sample_b": b, "logp_a": lp_a, "logp_b": lp_b,
                             "preferred": "A" if lp_a >= lp_b else "B"})
    chat.write_jsonl(out / "sft.jsonl", sft)
    chat.write_jsonl(out / "pairs.jsonl", pairs)
    chat.write_jsonl(out / "trace.jsonl", trace)
    return {"prompts": len(prompts), "sft": len(sft), "pairs": len(pairs), "truncated_prompts": model.truncated}
