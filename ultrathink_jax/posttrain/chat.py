"""Conversations -> token ids with a loss mask: the chat template, reading chat/preference jsonl, packing.

The template is the tokenizer's own `chat_template` (Jinja, as in transformers) when it has one, else
DEFAULT_TEMPLATE (ChatML), whose two special tokens are added to the tokenizer (and the embedding grows to fit,
see `resize_vocab`). A conversation is rendered one message at a time: the text a message adds to the rendering
of the messages before it is that message's piece, so every token is known to belong to one message. Assistant
pieces (their content and end-of-turn marker, not the "assistant" header the generation prompt already holds)
are the loss targets; everything else has mask 0.

Files: `.jsonl`, one example per line:
  SFT    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  or  {"prompt", "completion"}
  DPO    {"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ultrathink_jax import atomic
from ultrathink_jax.data.errors import DataError, DataFileNotFoundError
from ultrathink_jax.data.sources import read_utf8_file
from ultrathink_jax.data.packing import TokenStream
from ultrathink_jax.data.tokenizer import Tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML. Documented in README (Fine-tuning); used when the tokenizer brings no template of its own.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}" + IM_START + "{{ message['role'] }}\n{{ message['content'] }}" + IM_END + "\n"
    "{% endfor %}{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}")
ROLES = ("system", "user", "assistant")


def ensure_chat_template(tokenizer: Tokenizer) -> list[str]:
    """Gives `tokenizer` a chat template: its own, else DEFAULT_TEMPLATE with its special tokens added to the
    vocabulary. Returns the tokens added (the caller grows the embedding to `tokenizer.vocab_size`)."""
    if tokenizer.chat_template:
        return []
    added = [t for t in (IM_START, IM_END) if tokenizer.backend.token_to_id(t) is None]
    tokenizer.backend.add_special_tokens([IM_START, IM_END])
    tokenizer.chat_template = DEFAULT_TEMPLATE
    return added


def end_of_turn_id(tokenizer: Tokenizer) -> int:
    """The token generation stops at: <|im_end|> for the default template, else the tokenizer's EOS."""
    im_end = tokenizer.backend.token_to_id(IM_END)
    return im_end if im_end is not None and tokenizer.chat_template == DEFAULT_TEMPLATE else tokenizer.eos_id


def _template(tokenizer: Tokenizer):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not tokenizer.chat_template:
        raise DataError(f"tokenizer {tokenizer.source} has no chat template (call ensure_chat_template)")

    def raise_exception(message):
        raise DataError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # transformers' settings
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(tokenizer.chat_template)
    except jinja2.TemplateError as e:
        raise DataError(f"chat template of {tokenizer.source} does not parse: {e}") from None


def render(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    return _template(tokenizer).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                       bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(token ids, mask): mask 1 on the tokens of assistant messages (content + end of turn)."""
    template = _template(tokenizer)

    def text(msgs, gen):
        return template.render(messages=list(msgs), add_generation_prompt=gen, bos_token=tokenizer.bos_token,
                               eos_token=tokenizer.eos_token)

    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        assistant = message["role"] == "assistant"
        if assistant:  # the generation prompt ("<|im_start|>assistant\n") is context, not a target
            prompt = text(messages[:i], True)
            if not prompt.startswith(done):
                raise DataError("chat template is not prefix-consistent (a rendering of fewer messages is not a "
                                "prefix of the next one); cannot tell assistant tokens apart")
            piece = tokenizer.encode(prompt[len(done):])
            ids += piece
            mask += [0] * len(piece)
            done = prompt
        full = text(messages[:i + 1], False)
        if not full.startswith(done):
            raise DataError("chat template is not prefix-consistent (a rendering of fewer messages is not a "
                            "prefix of the next one); cannot tell assistant tokens apart")
        piece = tokenizer.encode(full[len(done):])
        ids += piece
        mask += [int(assistant)] * len(piece)
        done = full
    return ids, mask


def prompt_ids(tokenizer: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """The prompt a model answers: the conversation so far plus the assistant generation prompt."""
    return tokenizer.encode(render(tokenizer, messages, add_generation_prompt=True))


# ----------------------------------------------------------------------------------------------- files

def jsonl_objects(path: str | Path) -> Iterable[tuple[str, dict]]:
    """(`file:line`, object) for each non-blank line of a jsonl file; anything else is a one-line DataError."""
    p = Path(path)
    if not p.is_file():
        raise DataFileNotFoundError(f"data file does not exist: {p}")
    for n, line in enumerate(read_utf8_file(p)[0].splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(value, dict):
            raise DataError(f"{where}: expected a JSON object")
        yield where, value


def _files(spec: str) -> list[str]:
    files = [f.strip() for f in spec.split(",") if f.strip()]
    if not files:
        raise DataError("no data files given")
    return files


def _messages(where: str, value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: messages must be a non-empty list")
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role in {ROLES} and a string content, got {m!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def read_conversations(spec: str) -> list[list[dict]]:
    """SFT examples of comma-separated jsonl files, as message lists (each with an assistant message)."""
    out = []
    for f in _files(spec):
        for where, row in jsonl_objects(f):
            if "messages" in row:
                messages = _messages(where, row["messages"])
            elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
                messages = [{"role": "user", "content": row["prompt"]},
                            {"role": "assistant", "content": row["completion"]}]
            else:
                raise DataError(f"{where}: expected 'messages' or 'prompt' + 'completion' (strings)")
            if not any(m["role"] == "assistant" for m in messages):
                raise DataError(f"{where}: no assistant message (nothing to learn)")
            out.append(messages)
    if not out:
        raise DataError(f"no examples in {spec}")
    return out


def read_preferences(spec: str) -> list[tuple[list[dict], str, str]]:
    """DPO examples: (prompt messages, chosen answer, rejected answer)."""
    out = []
    for f in _files(spec):
        for where, row in jsonl_objects(f):
            if "prompt" not in row or not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
                raise DataError(f"{where}: expected 'prompt' (text or messages), 'chosen' and 'rejected' (strings)")
            out.append((_messages(where, row["prompt"]), row["chosen"], row["rejected"]))
    if not out:
        raise DataError(f"no examples in {spec}")
    return out


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Written whole to a temporary file, then renamed: a reader never sees half a file."""
    return atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------- tokens

def chat_stream(conversations: Sequence[Sequence[dict]], tokenizer: Tokenizer, vocab_size: int) -> TokenStream:
    """Conversations packed like text documents (each + EOS, EOS not trained), with the assistant mask."""
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    tokens, masks, starts, total = [], [], [], 0
    for messages in conversations:
        ids, mask = encode_conversation(tokenizer, messages)
        ids, mask = ids + [tokenizer.eos_id], mask + [0]
        if max(ids) >= vocab_size:
            raise DataError(f"token id {max(ids)} is outside the model's vocabulary [0, {vocab_size})")
        starts.append(total)
        total += len(ids)
        tokens.append(np.asarray(ids, dtype))
        masks.append(np.asarray(mask, np.uint8))
    return TokenStream(np.concatenate(tokens), np.asarray(starts, np.int64), np.concatenate(masks))


def sequence_row(ids: Sequence[int], mask: Sequence[int], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One unpacked sequence as a training row (segment 1, padding segment 0, weights = mask of the targets);
    cut to seq_len + 1 tokens."""
    ids, mask = list(ids)[:seq_len + 1], list(mask)[:seq_len + 1]
    n = len(ids)
    tokens = np.full(seq_len + 1, pad_id, np.int32)
    tokens[:n] = ids
    m = np.zeros(seq_len + 1, np.float32)
    m[:n] = mask
    segments = np.zeros(seq_len, np.int32)
    segments[:n - 1] = 1
    positions = np.zeros(seq_len, np.int32)
    positions[:n - 1] = np.arange(n - 1)
    return {"inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": segments, "positions": positions,
            "weights": m[1:] * (segments > 0)}


def preference_rows(tokenizer: Tokenizer, prompt: Sequence[dict], chosen: str, rejected: str, seq_len: int
                    ) -> tuple[dict, dict]:
    """The chosen and rejected conversations as rows whose weights cover the completion tokens only."""
    rows = []
    for answer in (chosen, rejected):
        ids, mask = encode_conversation(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
        first = mask.index(1) if 1 in mask else len(mask)
        if first >= seq_len:
            raise DataError(f"a DPO prompt has {first} tokens; data.seq_len={seq_len} leaves no room for the answer")
        rows.append(sequence_row(ids, mask, seq_len, tokenizer.pad_id))
    return rows[0], rows[1]
