"""Load GGUF files in llama.cpp (through llama-cpp-python) and record what it computes.

Run with the python of the separate `.venv-llama` (see the Makefile): it imports only llama_cpp and numpy, never our
packages. `python parity_tests/llamacpp_check.py REQUEST.json OUT_DIR` where REQUEST.json is

    {"models": {"NAME": {"file": "x.gguf", "input_ids": [...],        # next-token logits at every position
                         "prompt": [...], "new_tokens": N,             # greedy continuation (argmax of the logits)
                         "text": "..."}}}                              # llama.cpp's token ids of it

Writes OUT_DIR/NAME.npz (`logits` float32 [T, V], `generated` int64 [N], `text_ids` int64) and OUT_DIR/summary.json
(llama_cpp version, vocabulary size, the file's tokenizer.ggml.pre as llama.cpp read it). One model failing is
recorded (`error`) and the others still run; the exit status is 1 then.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import llama_cpp
import numpy as np


def check_model(spec: dict, out: Path, name: str) -> dict:
    ids = [int(i) for i in spec["input_ids"]]
    llm = llama_cpp.Llama(model_path=spec["file"], n_ctx=max(64, len(ids) + 8, len(spec["prompt"]) + spec["new_tokens"] + 8),
                          n_batch=512, logits_all=True, n_threads=1, verbose=False, seed=0,
                          # float32 KV cache (llama.cpp's default f16 cache alone costs ~4e-4 relative logits error)
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    arrays = {}
    llm.reset()
    llm.eval(ids)
    arrays["logits"] = np.array(llm.scores[:llm.n_tokens], np.float32)
    llm.reset()
    llm.eval([int(i) for i in spec["prompt"]])
    generated = []
    for _ in range(int(spec["new_tokens"])):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(token)
        llm.eval([token])
    arrays["generated"] = np.asarray(generated, np.int64)
    arrays["text_ids"] = np.asarray(llm.tokenize(spec["text"].encode("utf-8"), add_bos=False, special=True), np.int64)
    np.savez(out / f"{name}.npz", **arrays)
    return {"n_vocab": llm.n_vocab(), "pre": llm.metadata.get("tokenizer.ggml.pre"),
            "detokenized": llm.detokenize([int(i) for i in arrays["text_ids"]], special=True).decode("utf-8", "replace")}


def main(request_file: str, out_dir: str) -> int:
    request = json.loads(Path(request_file).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"llama_cpp": llama_cpp.__version__, "models": {}}
    status = 0
    for name, spec in request["models"].items():
        try:
            summary["models"][name] = check_model(spec, out, name)
        except Exception:  # record and go on: one broken file must not hide the others' results
            summary["models"][name] = {"error": traceback.format_exc(limit=3)}
            status = 1
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
