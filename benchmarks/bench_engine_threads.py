"""Where vLLM's CPU engine runs its compute threads: decode and prompt-scoring speed per thread-binding setting.

    .venv/bin/python benchmarks/bench_engine_threads.py          # 4 settings, one engine each: ~5 min idle

vLLM binds its OpenMP compute threads to the host's cores minus ``VLLM_CPU_NUM_OF_RESERVED_CPU`` (default: one per
local rank on x86) kept for its scheduler process; ``VLLM_CPU_OMP_THREADS_BIND`` picks the cores (``auto``, a list
such as ``0-1``, or ``nobind``). Each setting starts a fresh ``vllm.LLM`` on the embedded SmolLM2-135M in its own
process (fp32 or the CPU's faster dtype, eager, the same seed) and times: 16 prompts x 64 new tokens decoded together
(``ignore_eos``), and 32 prompt-logprob requests of ~200 tokens (what lm-eval's loglikelihood tasks send).
``engine.reserved_cpus`` / ``serve.reserved_cpus`` (``pipeline.hardware.cpu_engine_env``) follow from this table.

Writes ``benchmarks/results/bench_engine_threads.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SETTINGS = {  # name -> environment of the engine process
    "vllm default (1 core reserved)": {},
    "nobind": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"},
    "reserved 0, auto binding": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
    "reserved 0, all cores listed": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_OMP_THREADS_BIND": "all"},
}


def _probe(model: str, dtype: str) -> dict:
    """One engine in this process: start-up, decode tokens/s, prompt-scoring requests/s."""
    from vllm import LLM, SamplingParams

    t0 = time.monotonic()
    llm = LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=1024, max_num_seqs=128, seed=0)
    start = time.monotonic() - t0
    llm.generate(["Hello"] * 2, SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    prompts = [f"Write a short paragraph about topic number {i} in science." for i in range(16)]
    t = time.monotonic()
    outs = llm.generate(prompts, SamplingParams(max_tokens=64, temperature=1.0, ignore_eos=True), use_tqdm=False)
    decode_s = time.monotonic() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    scored = ["The quick brown fox jumps over the lazy dog. " * 20 + str(i) for i in range(32)]
    t = time.monotonic()
    llm.generate(scored, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    score_s = time.monotonic() - t
    return {"start_s": round(start, 1), "decode_tokens_per_s": round(tokens / decode_s, 1),
            "scoring_requests_per_s": round(len(scored) / score_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # run one probe and print its JSON
    ap.add_argument("--name", default="bench_engine_threads")
    args = ap.parse_args()
    if args.child:
        model, dtype = json.loads(args.child)
        print("RESULT " + json.dumps(_probe(model, dtype)), flush=True)
        return

    from pipeline.hardware import resolve_dtype
    from pipeline.model import prepare_embedded

    model = str(prepare_embedded())
    dtype, reason = resolve_dtype("auto", use_gpu=False)
    cpus = sorted(os.sched_getaffinity(0))
    rows = []
    for name, env in SETTINGS.items():
        env = {k: (f"{cpus[0]}-{cpus[-1]}" if v == "all" else v) for k, v in env.items()}
        child_env = {k: v for k, v in os.environ.items()
                     if k not in ("VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND")}
        child_env.update(env, VLLM_CPU_KVCACHE_SPACE="2", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps([model, dtype])], env=child_env,
                              capture_output=True, text=True, timeout=900)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"setting {name!r} failed:\n{proc.stderr[-3000:]}")
        rows.append({"setting": name, "env": env, **json.loads(lines[-1][len("RESULT "):])})
        print(rows[-1], flush=True)
    base = rows[0]
    for r in rows:
        r["decode_vs_default"] = round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2)
        r["scoring_vs_default"] = round(r["scoring_requests_per_s"] / base["scoring_requests_per_s"], 2)
    result = {"benchmark": "bench_engine_threads", "dtype": dtype, "dtype_reason": reason, "cpus": len(cpus),
              "rows": rows, "machine": common.machine()}
    path = common.save_json(args.name, result)
    print(common.table([[r["setting"], r["decode_tokens_per_s"], r["decode_vs_default"], r["scoring_requests_per_s"],
                         r["scoring_vs_default"], r["start_s"]] for r in rows],
                       ["setting", "decode tok/s", "x default", "scoring req/s", "x default", "start s"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
