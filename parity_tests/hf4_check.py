"""Load exported Hugging Face directories in ANOTHER transformers install and record what it computes.

Run with the python of a separate venv (transformers 4.x): it imports only torch, numpy and transformers, never our
packages. `python parity_tests/hf4_check.py REQUEST.json OUT_DIR` where REQUEST.json is

    {"models": {"NAME": {"dir": "...", "input_ids": [[...]],            # logits of these ids
                         "generate": {"prompt": [...], "new_tokens": N},  # optional: greedy continuation
                         "text": "..."}}}                                 # optional: AutoTokenizer ids of it

Each model loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained(dir, local_files_only=True) and no
trust_remote_code, in float32. Writes OUT_DIR/NAME.npz (`logits` float32 [B, T, V], `generated` int64 [N],
`text_ids` int64) and OUT_DIR/summary.json: transformers version, loaded class, missing / unexpected / mismatched
keys reported by the loader, special token ids. One model failing to load is recorded (`error`) and the others still
run; the exit status is 1 then, 2 for a bad request.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import transformers

torch.set_num_threads(1)  # tiny models: extra threads only add contention
# from_pretrained's dtype argument: `dtype` from 4.56 on (`torch_dtype` then warns); before, `dtype` was stored
# into the config as an unknown attribute.
_VERSION = tuple(int(x) for x in transformers.__version__.split(".")[:2])
DTYPE_ARG = "dtype" if _VERSION >= (4, 56) else "torch_dtype"


def _loading_info(info: dict) -> dict:
    keys = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    return {k: sorted(str(x) for x in info.get(k, [])) for k in keys}


def check_model(spec: dict, out: Path, name: str) -> dict:
    model_dir = spec["dir"]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, output_loading_info=True, **{DTYPE_ARG: torch.float32})
    model.eval()
    record = {"class": type(model).__name__, "loading": _loading_info(info),
              "head_dim": getattr(model.config, "head_dim", None)}
    arrays = {}
    with torch.no_grad():
        ids = torch.tensor(spec["input_ids"], dtype=torch.long)
        arrays["logits"] = model(ids, attention_mask=torch.ones_like(ids)).logits.float().numpy()
        gen = spec.get("generate")
        if gen:
            prompt = torch.tensor([gen["prompt"]], dtype=torch.long)
            n = int(gen["new_tokens"])
            full = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)
            arrays["generated"] = full[0, prompt.shape[1]:].numpy().astype(np.int64)
    if spec.get("text") is not None:
        tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        arrays["text_ids"] = np.asarray(tok(spec["text"])["input_ids"], np.int64)
        record["tokenizer"] = {"class": type(tok).__name__, "eos_token_id": tok.eos_token_id,
                               "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
                               "decoded": tok.decode(arrays["text_ids"].tolist())}
    np.savez(out / f"{name}.npz", **arrays)
    return record


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: hf4_check.py REQUEST.json OUT_DIR", file=sys.stderr)
        return 2
    try:
        request = json.loads(Path(argv[1]).read_text())
        models = request["models"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        print(f"hf4_check: bad request {argv[1]}: {e}", file=sys.stderr)
        return 2
    out = Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    summary = {"transformers": transformers.__version__, "torch": torch.__version__, "models": {}}
    failed = False
    for name, spec in models.items():
        try:
            summary["models"][name] = check_model(spec, out, name)
        except Exception as e:  # recorded per model: the caller reports which export failed and why
            failed = True
            summary["models"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
