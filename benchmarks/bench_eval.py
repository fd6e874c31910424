"""tgsft's lm-eval scoring vs a plain lm-eval ``local-completions`` client, same tasks, items and model, side by side.

    .venv/bin/python benchmarks/bench_eval.py                                  # ~12 min on 2 idle cores
    .venv/bin/python benchmarks/bench_eval.py --limit 100 --settings 4x8       # more items, fewer tgsft settings

One Ray, one Serve HTTP proxy, two applications deployed once, warmed up, and kept for every arm:

- ``tgsft``: ``pipeline.serve.serving`` with ``configs/local.yaml`` (the app ``tgsft eval`` starts: ``build_app_args``, ``dtype: auto`` settled
  by the matmul probe), model id ``base``;
- ``plain``: ``ray.serve.llm.build_openai_app`` with one ``LLMConfig`` of the same model folder, dtype, context
  length and eager mode (the recipe of a plain Ray Serve LLM deployment), under ``/plain``.

Arm A is ``pipeline.evaluate.run_lm_eval`` with the config's ``eval`` values (what ``tgsft eval`` runs per model),
against ``tgsft``. Arm B is ``lm_eval.simple_evaluate(model="local-completions")`` with ``num_concurrent=16`` and
``batch_size=1`` against ``plain``. Both use the offline mirrors in ``--data-dir`` with ``--limit`` items per task.
Requests are lm-eval's loglikelihood requests (one per answer choice), counted from each arm's per-sample records;
requests/s divides them by the wall time of the scoring call (Serve start-up excluded). After an untimed pass of each
arm on 2 items, A and B alternate (``--repeats`` pairs); afterwards arm A runs once per extra ``--settings`` entry (``num_concurrent x batch_size``).

Writes ``benchmarks/results/bench_eval.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

# ----------------------------------------------------------------------------- defaults
TASKS = ["tgsft_arc_easy", "tgsft_sciq"]  # 4 choices per item: ~4 requests per item
LIMIT = 20  # items per task: ~160 requests per arm, ~60 s each at ~3 requests/s (AVX2 CPU, fp32)
PLAIN_CONCURRENT = 16  # the plain client: 16 parallel requests, one lm-eval request per HTTP call
PLAIN_ID = "smollm2"
PLAIN_ROUTE = "/plain"


def _config(out_root: Path, tasks: list[str], data_dir: str, limit: int, port: int):
    from pipeline.config import load_config

    return load_config(common.REPO / "configs" / "local.yaml", overrides=[  # what `make run` evaluates with
        f"output_root={out_root}", "name=bench_eval", f"eval.tasks={json.dumps(tasks)}", f"eval.data_dir={data_dir}",
        f"eval.limit={limit}", f"serve.port={port}",
    ])


def _requests(samples: dict[str, list]) -> int:
    """lm-eval requests behind per-sample records: one per entry of each record's ``arguments``."""
    return sum(len(r["arguments"]) for rows in samples.values() for r in rows)


def _accuracy(results: dict) -> dict[str, float]:
    return {t: round(r["acc,none"], 4) for t, r in results.items() if "acc,none" in r}


# ----------------------------------------------------------------------------- arm A: tgsft


def run_tgsft(cfg, base_url: str, model_path: str, *, num_concurrent: int, batch_size: int, work: Path) -> dict:
    from pipeline.evaluate import run_lm_eval

    ev = cfg.eval
    samples_dir = work / f"tgsft-{num_concurrent}x{batch_size}-{time.monotonic_ns()}"
    t0 = time.monotonic()
    out = run_lm_eval(
        base_url=base_url, model_id="base", tokenizer=model_path, tasks=ev.tasks, data_dir=ev.data_dir,
        limit=ev.limit, num_fewshot=ev.num_fewshot, num_concurrent=num_concurrent, batch_size=batch_size,
        max_length=cfg.model.max_model_len, samples_dir=samples_dir,
    )
    wall = time.monotonic() - t0
    samples = {f.stem: [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
               for f in samples_dir.glob("samples_*.jsonl")}
    n = _requests(samples)
    return {"arm": "tgsft", "num_concurrent": num_concurrent, "batch_size": batch_size, "requests": n,
            "items": sum(t["n"] or 0 for t in out.values()), "seconds": round(wall, 2),
            "requests_per_s": round(n / wall, 2),
            "acc": {t: round(r["metrics"]["acc"]["value"], 4) for t, r in out.items() if "acc" in r["metrics"]}}


# ----------------------------------------------------------------------------- arm B: plain lm-eval client


def deploy_plain(model_path: str, engine_kwargs: dict, env: dict) -> None:
    """A plain Ray Serve LLM OpenAI app of the model under ``PLAIN_ROUTE`` (Serve already started)."""
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    llm = LLMConfig(
        model_loading_config={"model_id": PLAIN_ID, "model_source": model_path},
        engine_kwargs=engine_kwargs,
        placement_group_config={"bundles": [{"CPU": 1}]},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        runtime_env={"env_vars": env},
    )
    serve.run(build_openai_app({"llm_configs": [llm]}), name="plain", route_prefix=PLAIN_ROUTE, blocking=False)


def run_plain(cfg, base_url: str, model_path: str) -> dict:
    import lm_eval

    from pipeline.tasks import task_manager

    ev = cfg.eval
    model_args = {"model": PLAIN_ID, "base_url": f"{base_url}{PLAIN_ROUTE}/v1/completions", "tokenizer": model_path,
                  "tokenizer_backend": "huggingface", "num_concurrent": PLAIN_CONCURRENT, "max_retries": 2,
                  "max_length": cfg.model.max_model_len}
    t0 = time.monotonic()
    res = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=ev.tasks,
                                  task_manager=task_manager(data_dir=ev.data_dir), limit=ev.limit, batch_size=1,
                                  log_samples=True)
    wall = time.monotonic() - t0
    n = _requests(res["samples"])
    return {"arm": "plain", "num_concurrent": PLAIN_CONCURRENT, "batch_size": 1, "requests": n,
            "items": sum(len(v) for v in res["samples"].values()), "seconds": round(wall, 2),
            "requests_per_s": round(n / wall, 2), "acc": _accuracy(res["results"])}


def warm_up(base_url: str, model_id: str, *, n: int = 32) -> None:
    """``n`` prompt-logprob requests, 16 at a time: the first requests to a fresh engine are slow (allocations,
    first shapes) and would be charged to whichever arm runs first."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.serve import request_json

    prompt = "Question: Which of these animals is a mammal that lives in the ocean? Answer: the whale. " * 3
    payload = {"model": model_id, "prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda _: request_json(f"{base_url}/v1/completions", payload=payload), range(n)))


# ----------------------------------------------------------------------------- report


def _markdown(result: dict) -> str:
    s = result["summary"]
    rows = [[r["arm"], f"{r['num_concurrent']} x {r['batch_size']}", r["requests"], r["seconds"], r["requests_per_s"],
             ", ".join(f"{k.removeprefix('tgsft_')} {v}" for k, v in r["acc"].items()), r["load_after"]]
            for r in result["runs"]]
    return "\n".join([
        "# bench_eval", "",
        (f"Tasks {', '.join(result['tasks'])}, {result['limit']} items each; served dtype {result['dtype']} "
         f"({result['dtype_reason']}); enforce_eager {result['enforce_eager']}."), "",
        common.table(rows, ["arm", "concurrent x batch", "requests", "seconds", "requests/s", "acc",
                            "load after"]), "",
        (f"**ratio** (tgsft {s['tgsft_requests_per_s']:.3g} / plain {s['plain_requests_per_s']:.3g} requests/s, medians): "
         f"**{s['ratio']}**; best tgsft setting: {s['best_tgsft_setting']} ({s['best_tgsft_requests_per_s']} "
         "requests/s)."), "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--limit", type=int, default=LIMIT, help="items per task")
    ap.add_argument("--data-dir", default=str(common.REPO.parent / "shared" / "data" / "eval"))
    ap.add_argument("--repeats", type=int, default=3, help="A/B pairs at the config's eval settings, alternated")
    ap.add_argument("--settings", default="4x8,32x1",
                    help="extra tgsft runs, num_concurrent x batch_size, comma-separated ('' for none)")
    ap.add_argument("--name", default="bench_eval")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # see bench_generate: no OOM-kills mid-run

    from pipeline.hardware import resolve_dtype
    from pipeline.model import prepare_embedded
    from pipeline.runtime import init_ray
    from pipeline.serve import build_app_args, free_port, serving, wait_ready

    model_path = str(prepare_embedded())
    work = Path(tempfile.mkdtemp(prefix="tgsft-bench-eval-"))
    cfg = _config(work, args.tasks.split(","), args.data_dir, args.limit, free_port())
    dtype, reason = resolve_dtype(cfg.model.dtype, use_gpu=cfg.serve.gpus_per_replica > 0)  # as serving() does
    tgsft_args = build_app_args({"base": model_path}, serve=cfg.serve, model=cfg.model.model_copy(
        update={"dtype": dtype}))["llm_configs"][0]
    default = (cfg.eval.num_concurrent, cfg.eval.batch_size)
    extra = [tuple(int(x) for x in s.split("x")) for s in args.settings.split(",") if s]
    before = common.machine()
    init_ray(num_cpus=8)  # logical CPUs for two apps' engines, servers and ingresses
    runs: list[dict] = []

    def record(r: dict) -> None:
        r["load_after"] = round(os.getloadavg()[0], 2)
        runs.append(r)
        print(f"  {r['arm']} {r['num_concurrent']}x{r['batch_size']}: {r['requests']} requests in {r['seconds']} s "
              f"= {r['requests_per_s']}/s, acc {r['acc']}", flush=True)

    t0 = time.monotonic()
    with serving(cfg, {"base": model_path}) as url:
        deploy_plain(model_path, tgsft_args["engine_kwargs"], tgsft_args["runtime_env"]["env_vars"])
        wait_ready(f"{url}{PLAIN_ROUTE}", model_ids=[PLAIN_ID], timeout_s=cfg.serve.ready_timeout_s)
        startup = round(time.monotonic() - t0, 1)
        warm_up(url, "base")
        warm_up(f"{url}{PLAIN_ROUTE}", PLAIN_ID)
        # One untimed pass of each client on 2 items: the first lm-eval call of a process builds its task index and
        # loads the datasets, which would otherwise be charged to whichever arm runs first.
        tiny = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"limit": 2})})
        run_tgsft(tiny, url, model_path, num_concurrent=default[0], batch_size=default[1], work=work)
        run_plain(tiny, url, model_path)
        print(f"both apps ready in {startup} s at {url}; dtype {dtype} ({reason})", flush=True)
        for _ in range(args.repeats):
            record(run_tgsft(cfg, url, model_path, num_concurrent=default[0], batch_size=default[1], work=work))
            record(run_plain(cfg, url, model_path))
        for conc, bs in extra:
            record(run_tgsft(cfg, url, model_path, num_concurrent=conc, batch_size=bs, work=work))

    med = lambda arm, setting=None: round(statistics.median(  # noqa: E731
        r["requests_per_s"] for r in runs if r["arm"] == arm and (setting is None or
                                                                (r["num_concurrent"], r["batch_size"]) == setting)), 3)
    per_setting = {f"{c}x{b}": med("tgsft", (c, b)) for c, b in dict.fromkeys([default, *extra])}
    best = max(per_setting, key=per_setting.get)
    summary = {"tgsft_requests_per_s": med("tgsft", default), "plain_requests_per_s": med("plain"),
               "tgsft_setting": f"{default[0]}x{default[1]}", "tgsft_requests_per_s_by_setting": per_setting,
               "best_tgsft_setting": best, "best_tgsft_requests_per_s": per_setting[best],
               "same_requests": len({r["requests"] for r in runs}) == 1}
    summary["ratio"] = round(summary["tgsft_requests_per_s"] / summary["plain_requests_per_s"], 3)
    result = {"benchmark": "bench_eval", "ratio": summary["ratio"], "tasks": cfg.eval.tasks, "limit": cfg.eval.limit,
              "dtype": dtype, "dtype_reason": reason, "enforce_eager": cfg.serve.enforce_eager,
              "max_model_len": cfg.model.max_model_len, "engine_kwargs": tgsft_args["engine_kwargs"],
              "serve_startup_seconds": startup, "targets": {"ratio >= 0.9": summary["ratio"] >= 0.9},
              "machine_before": before, "machine_after": common.machine(), "summary": summary, "runs": runs}
    path = common.save_json(args.name, result)
    path.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
