"""tgsft tree generation vs a plain ``vllm.LLM.generate`` loop over exactly the same prompts, side by side.

    .venv/bin/python benchmarks/bench_generate.py                  # one full A/B pair + settings sweep: ~15 min idle
    .venv/bin/python benchmarks/bench_generate.py --repeats 2      # A B A B on the full tree, medians reported
    .venv/bin/python benchmarks/bench_generate.py --settings ''    # the full A/B pair only

Arm A runs ``pipeline.generate.generate`` on the embedded SmolLM2-135M (one engine actor started once per run,
rows routed through Ray Data, filters, question dedup with the real embedder, Parquet levels). Arm B starts a
``vllm.LLM`` in this process with the same engine kwargs (``engine_options``) and, level by level, generates the
prompts tgsft used: rebuilt from the nodes arm A wrote (``pipeline.tree`` paths rendered by ``pipeline.chat``),
with the same seeds, max_tokens, stop strings and sampling settings. Per-node prompt token counts of the two arms
are compared to prove the prompts are identical. Both arms always run on the same engine settings, with the dtype
settled once in the driver (``dtype: auto`` -> ``pipeline.hardware.resolve_dtype``) and passed to both.

First the A/B pair(s) on the full tree at the local default (resolved dtype, ``enforce_eager=True``,
``max_num_seqs`` 128) give ``ratio``. Then a sweep of engine settings on a small tree (``--sweep-branching``), one
A/B pair per setting (``dtype/eager|compiled/max_num_seqs``, ``auto`` = the resolved dtype): absolute tokens/s of
both arms and each engine's start-up (a compiled engine compiles with inductor on its first start, cached under
~/.cache/vllm for later ones). The JSON is rewritten after every setting.

Writes ``benchmarks/results/bench_generate.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import gc
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
BRANCHING = [6, 1, 2, 1]  # at most 6+6+12+12 = 36 nodes (2-turn dialogues); ~1.5 k generated tokens
MAX_NEW_TOKENS = [32, 64, 32, 64]  # L_i: questions, answers
_KIND_OF_ROLE = {"user": "question", "assistant": "answer"}


SWEEP_BRANCHING = [4, 1]  # 4 questions + 4 answers, ~350 generated tokens per arm and setting
SWEEP_MAX_NEW_TOKENS = [32, 64]
# dtype/mode/max_num_seqs[/reservedN]; "auto" is the dtype this CPU multiplies faster. 2 < 4 prompts per level: two
# waves. reservedN: cores vLLM keeps off its compute threads (engine.reserved_cpus; unset = tgsft's default, 0 on
# small hosts; vLLM's own default is 1, which on a 2-core host computes on one core).
SETTINGS = ["float32/eager/128", "float32/eager/128/reserved1", "float32/compiled/128", "float32/eager/2",
            "bfloat16/eager/128"]
DEFAULT_SETTING = "auto/eager/128"  # configs/local.yaml's engine section today


def _parse_setting(setting: str, dtype_auto: str) -> dict:
    dtype, mode, seqs, *reserved = setting.split("/")
    if mode not in ("eager", "compiled"):
        raise ValueError(f"--settings: mode must be eager or compiled, got {mode!r} in {setting!r}")
    if reserved and not (len(reserved) == 1 and reserved[0].startswith("reserved") and reserved[0][8:].isdigit()):
        raise ValueError(f"--settings: the optional 4th part is reservedN (e.g. reserved1), got {setting!r}")
    return {"dtype": dtype_auto if dtype == "auto" else dtype, "enforce_eager": mode == "eager",
            "max_num_seqs": int(seqs), "reserved_cpus": int(reserved[0][8:]) if reserved else None}


def _config(out_root: Path, branching: list[int], lengths: list[int], setting: dict):
    from pipeline.config import load_config

    return load_config(None, overrides=[
        f"output_root={out_root}", "name=bench", "tree.preset=null", f"tree.branching={branching}",
        f"tree.max_new_tokens={lengths}", f"model.dtype={setting['dtype']}",
        f"engine.enforce_eager={str(setting['enforce_eager']).lower()}", f"engine.max_num_seqs={setting['max_num_seqs']}",
        *([f"engine.reserved_cpus={setting['reserved_cpus']}"] if setting["reserved_cpus"] is not None else []),
    ])


# ----------------------------------------------------------------------------- arm A: tgsft


def run_tgsft(cfg, out_dir: Path) -> dict:
    from pipeline.generate import generate

    lines: list[str] = []
    t0 = time.monotonic()
    manifest = generate(cfg, out_dir=out_dir, overwrite=True, log=lambda s: (lines.append(s), print("  A:", s)))
    wall = time.monotonic() - t0
    levels = manifest["levels"]
    em = manifest["engine_metrics"]
    tot = manifest["totals"]
    start = manifest.get("engine_start_seconds", 0.0)
    return {
        "arm": "tgsft",
        "generated_nodes": tot["generated"],
        "kept_nodes": tot["kept"],
        "generated_tokens": tot["generated_tokens"],
        "prompt_tokens": tot["prompt_tokens"],
        "generate_seconds": tot["generate_seconds"],  # per level: prompts + Ray Data + engine, summed
        "dedup_seconds": tot["dedup_seconds"],
        "dedup_share": round(tot["dedup_seconds"] / tot["generate_seconds"], 4),
        "wall_seconds": round(wall, 2),
        "engine_start_seconds": start,
        "run_seconds_after_start": round(wall - start, 2),
        "tokens_per_s": round(tot["generated_tokens"] / tot["generate_seconds"], 1),
        "tokens_per_s_end_to_end": round(tot["generated_tokens"] / (wall - start), 1),
        "engine_starts": sum(s.startswith("engines:") for s in lines),  # pool starts logged by generate()
        "replicas": em["replicas"],
        "engine_calls": em["calls"],  # fewer than the batches sent means the actor restarted (counters reset)
        "batches_sent": sum(-(-v["generated"] // cfg.engine.batch_size) for v in levels.values()),
        "prefix_cache_hit_rate": em.get("prefix_cache_hit_rate"),
        "prefix_cache_hits": em.get("vllm:prefix_cache_hits"),
        "prefix_cache_queries": em.get("vllm:prefix_cache_queries"),
        "per_level": {k: {f: v[f] for f in ("kind", "generated", "kept", "generated_tokens", "prompt_tokens",
                                              "generate_seconds", "dedup_seconds", "tokens_per_s")}
                      for k, v in levels.items()},
    }


# ----------------------------------------------------------------------------- arm B: plain vLLM loop


def _frontiers(cfg, out_dir: Path, model_path: str):
    """Per level: the node rows tgsft wrote and the prompts it sent for them, rebuilt from the parents' paths."""
    from transformers import AutoTokenizer

    from pipeline import chat, tree
    from pipeline.corpus import read_level

    tok = AutoTokenizer.from_pretrained(model_path)
    render = chat.renderer(tok)
    fmt = chat.probe(render, special_tokens=tok.all_special_tokens)
    system = chat.root_messages(cfg.tree.system_prompt, fmt)
    paths: dict[str, tuple] = {tree.ROOT_ID: ()}
    out = []
    for layer in tree.schedule(cfg.tree.branching, cfg.tree.max_new_tokens, cfg.tree.mode):
        rows = read_level(out_dir, layer.level)[0].to_pylist()
        for r in rows:
            r["kind"] = _KIND_OF_ROLE[r["role"]]
        build = chat.question_prompt if layer.kind == "question" else chat.answer_prompt
        prompts = [build(render, tree.path_messages(system, paths[r["parent_id"]])) for r in rows]
        sampling = (cfg.tree.question if layer.kind == "question" else cfg.tree.answer).model_dump()
        out.append((layer, rows, prompts, fmt.stops(layer.kind), sampling))
        paths = tree.grow_paths(paths, rows)
    return out


def run_raw(cfg, out_dir: Path, model_path: str, opts: dict) -> dict:
    os.environ.update(opts["env"])
    from vllm import LLM, SamplingParams

    frontiers = _frontiers(cfg, out_dir, model_path)
    t0 = time.monotonic()
    llm = LLM(model=model_path, **opts["engine_kwargs"])
    start = time.monotonic() - t0
    print(f"  B: engine started in {start:.1f} s")
    gen_s, tokens, prompt_tokens, nodes, same_prompt, per_level = 0.0, 0, 0, 0, 0, {}
    for layer, rows, prompts, stop, sampling in frontiers:
        params = [SamplingParams(n=1, seed=int(r["seed"]), max_tokens=layer.max_new_tokens, stop=list(stop), **sampling)
                  for r in rows]
        t = time.monotonic()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.monotonic() - t
        n_tok = sum(len(o.outputs[0].token_ids) for o in outs)
        p_tok = [len(o.prompt_token_ids) for o in outs]
        same_prompt += sum(a == r["prompt_tokens"] for a, r in zip(p_tok, rows))
        gen_s, tokens, prompt_tokens, nodes = gen_s + dt, tokens + n_tok, prompt_tokens + sum(p_tok), nodes + len(rows)
        per_level[str(layer.level)] = {"kind": layer.kind, "generated": len(rows), "generated_tokens": n_tok,
                                       "generate_seconds": round(dt, 3), "tokens_per_s": round(n_tok / dt, 1)}
        print(f"  B: level {layer.level} {layer.kind}: {len(rows)} prompts, {n_tok} tokens in {dt:.1f} s")
    metrics = {m.name: float(m.value) for m in llm.get_metrics() if isinstance(getattr(m, "value", None), (int, float))}
    del llm
    gc.collect()
    hits, queries = metrics.get("vllm:prefix_cache_hits", 0.0), metrics.get("vllm:prefix_cache_queries", 0.0)
    return {
        "arm": "vllm_loop",
        "generated_nodes": nodes,
        "generated_tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "prompts_with_same_token_count": same_prompt,
        "generate_seconds": round(gen_s, 3),
        "engine_start_seconds": round(start, 2),
        "tokens_per_s": round(tokens / gen_s, 1),
        "prefix_cache_hit_rate": round(hits / queries, 4) if queries else None,
        "prefix_cache_hits": hits,
        "prefix_cache_queries": queries,
        "per_level": per_level,
    }


# ----------------------------------------------------------------------------- report


def _plot(pairs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(pairs))
    ax1.bar([i - 0.2 for i in x], [p["a"]["tokens_per_s"] for p in pairs], 0.4, label="tgsft (A)")
    ax1.bar([i + 0.2 for i in x], [p["b"]["tokens_per_s"] for p in pairs], 0.4, label="vLLM loop (B)")
    ax1.set_xticks(list(x), [f"pair {i + 1}\nratio {p['ratio']:.2f}" for i, p in enumerate(pairs)])
    ax1.set_ylabel("generated tokens / s")
    ax1.set_title("Same tree, same prompts/seeds, same engine settings")
    ax1.legend()
    levels = sorted(pairs[0]["a"]["per_level"], key=int)
    for arm, label in (("a", "tgsft"), ("b", "vLLM loop")):
        ax2.plot([int(k) for k in levels], [pairs[0][arm]["per_level"][k]["tokens_per_s"] for k in levels],
                 marker="o", label=label)
    ax2.set_xlabel("level")
    ax2.set_ylabel("tokens / s (pair 1)")
    ax2.set_title("Per level")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _pair(cfg, out_dir: Path, model_path: str, label: str) -> dict:
    """Arm A then arm B on one config: both sides' results and their ratio."""
    from pipeline.generate import engine_options

    print(f"{label}, arm A (tgsft); load {os.getloadavg()[0]:.1f}", flush=True)
    a = run_tgsft(cfg, out_dir)
    print(f"{label}, arm B (vllm.LLM loop); load {os.getloadavg()[0]:.1f}", flush=True)
    b = run_raw(cfg, out_dir, model_path, engine_options(cfg.model, cfg.engine))
    return {"a": a, "b": b, "ratio": round(a["tokens_per_s"] / b["tokens_per_s"], 3),
            "ratio_end_to_end": round(a["tokens_per_s_end_to_end"] / b["tokens_per_s"], 3),
            "load_after": [round(x, 2) for x in os.getloadavg()]}


def _sweep_row(setting: str, p: dict) -> dict:
    a, b = p["a"], p["b"]
    return {"setting": setting, "tgsft_tokens_per_s": a["tokens_per_s"], "vllm_loop_tokens_per_s": b["tokens_per_s"],
            "ratio": p["ratio"], "tgsft_engine_start_seconds": a["engine_start_seconds"],
            "vllm_loop_engine_start_seconds": b["engine_start_seconds"], "generated_tokens": a["generated_tokens"],
            "load_after": p["load_after"][0]}


def _compile_payoff(sweep: list[dict], make_run_tokens: int) -> dict | None:
    """Does the compiled engine's extra start-up pay back within ``make_run_tokens`` generated tokens?"""
    rows = {r["setting"]: r for r in sweep}
    pairs = [(rows[k], rows[k.replace("/compiled/", "/eager/")]) for k in rows
             if "/compiled/" in k and k.replace("/compiled/", "/eager/") in rows]
    if not pairs:
        return None
    comp, eager = pairs[0]
    tps_c, tps_e = comp["vllm_loop_tokens_per_s"], eager["vllm_loop_tokens_per_s"]
    # start-up: the first (tgsft) arm compiles when the cache is cold; the second arm's start is the cached one
    extra_cold = comp["tgsft_engine_start_seconds"] - eager["tgsft_engine_start_seconds"]
    extra_cached = comp["vllm_loop_engine_start_seconds"] - eager["vllm_loop_engine_start_seconds"]
    saved = make_run_tokens / tps_e - make_run_tokens / tps_c  # seconds saved over make run's generation
    return {"compiled": comp["setting"], "eager": eager["setting"], "speedup": round(tps_c / tps_e, 3),
            "extra_start_seconds_first_start": round(extra_cold, 1),
            "extra_start_seconds_cached": round(extra_cached, 1), "make_run_generated_tokens": make_run_tokens,
            "seconds_saved_in_make_run_generation": round(saved, 1),
            "pays_off_cached": saved > extra_cached, "pays_off_first_start": saved > extra_cold}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1, help="A/B pairs on the full tree, alternated (A B A B ...)")
    ap.add_argument("--branching", type=str, default=str(BRANCHING))
    ap.add_argument("--max-new-tokens", type=str, default=str(MAX_NEW_TOKENS))
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help="sweep settings dtype/eager|compiled/max_num_seqs, comma-separated ('' skips the sweep)")
    ap.add_argument("--sweep-branching", type=str, default=str(SWEEP_BRANCHING))
    ap.add_argument("--sweep-max-new-tokens", type=str, default=str(SWEEP_MAX_NEW_TOKENS))
    ap.add_argument("--make-run-tokens", type=int, default=4793,
                    help="tokens `make run` generates (its corpus manifest's totals.generated_tokens), for the "
                    "compile pay-off estimate")
    ap.add_argument("--name", default="bench_generate")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import yaml

    from pipeline.generate import engine_options
    from pipeline.hardware import resolve_dtype
    from pipeline.model import prepare_embedded
    from pipeline.runtime import init_ray

    model_path = str(prepare_embedded())
    dtype_auto, dtype_reason = resolve_dtype("auto", use_gpu=False)
    print(f"dtype auto -> {dtype_auto} ({dtype_reason})", flush=True)
    before = common.machine()
    tmp = Path(tempfile.mkdtemp(prefix="tgsft-bench-gen-"))
    # Other jobs fill this shared machine's memory; Ray's memory monitor would kill (and restart) the engine actor
    # mid-run, which resets its prefix cache and counters and pays a second start.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    init_ray(num_cpus=max(8, 2 * (os.cpu_count() or 1)))

    default = _parse_setting(DEFAULT_SETTING, dtype_auto)
    cfg = _config(tmp, yaml.safe_load(args.branching), yaml.safe_load(args.max_new_tokens), default)
    opts = engine_options(cfg.model, cfg.engine)
    pairs = [_pair(cfg, tmp / f"corpus{rep}", model_path, f"full pair {rep + 1}/{args.repeats}")
             for rep in range(args.repeats)]

    med = lambda f: round(statistics.median(f(p) for p in pairs), 4)  # noqa: E731
    summary = {
        "generated_nodes": pairs[0]["a"]["generated_nodes"],
        "tgsft_tokens_per_s": med(lambda p: p["a"]["tokens_per_s"]),
        "vllm_loop_tokens_per_s": med(lambda p: p["b"]["tokens_per_s"]),
        "ratio": med(lambda p: p["ratio"]),
        "ratio_end_to_end": med(lambda p: p["ratio_end_to_end"]),
        "engine_starts_per_run": max(p["a"]["engine_starts"] for p in pairs),
        "engine_restarts_seen": any(p["a"]["engine_calls"] < p["a"]["batches_sent"] for p in pairs),
        "replicas": pairs[0]["a"]["replicas"],
        "tgsft_prefix_cache_hit_rate": med(lambda p: p["a"]["prefix_cache_hit_rate"]),
        "vllm_loop_prefix_cache_hit_rate": med(lambda p: p["b"]["prefix_cache_hit_rate"]),
        "dedup_share": med(lambda p: p["a"]["dedup_share"]),
        "identical_prompts": all(p["b"]["prompts_with_same_token_count"] == p["b"]["generated_nodes"] for p in pairs),
    }
    targets = {
        "ratio >= 0.95": summary["ratio"] >= 0.95,
        "one engine start per replica": summary["engine_starts_per_run"] == 1 and not summary["engine_restarts_seen"],
        "prefix-cache hit rate >= 50%": summary["tgsft_prefix_cache_hit_rate"] >= 0.5,
        "dedup <= 10% of generation": summary["dedup_share"] <= 0.10,
    }
    sweep: list[dict] = []
    result = {"benchmark": "bench_generate", "ratio": summary["ratio"], "dtype": default["dtype"],
              "dtype_reason": dtype_reason, "setting": DEFAULT_SETTING.replace("auto", default["dtype"]),
              "branching": cfg.tree.branching, "max_new_tokens": cfg.tree.max_new_tokens,
              "engine_kwargs": opts["engine_kwargs"], "engine_env": opts["env"],
              "enforce_eager": default["enforce_eager"],
              "sweep": {"branching": yaml.safe_load(args.sweep_branching),
                        "max_new_tokens": yaml.safe_load(args.sweep_max_new_tokens), "rows": sweep, "best": None,
                        "compile_payoff": None, "pairs": {}},
              "machine_before": before, "machine_after": common.machine(), "summary": summary, "targets": targets,
              "pairs": pairs}
    path = common.save_json(args.name, result)
    _plot(pairs, path.with_suffix(".png"))

    for setting in [s for s in args.settings.split(",") if s]:  # saved after every setting
        scfg = _config(tmp, yaml.safe_load(args.sweep_branching), yaml.safe_load(args.sweep_max_new_tokens),
                       _parse_setting(setting, dtype_auto))
        p = _pair(scfg, tmp / f"sweep-{setting.replace('/', '-')}", model_path, f"setting {setting}")
        result["sweep"]["pairs"][setting] = p
        sweep.append(_sweep_row(setting, p))
        print(f"  {sweep[-1]}", flush=True)
        best = max(sweep, key=lambda r: r["vllm_loop_tokens_per_s"] + r["tgsft_tokens_per_s"])
        result["sweep"].update(best=best["setting"], compile_payoff=_compile_payoff(sweep, args.make_run_tokens))
        result["machine_after"] = common.machine()
        common.save_json(args.name, result)

    if sweep:
        print(common.table([[r["setting"], r["tgsft_tokens_per_s"], r["vllm_loop_tokens_per_s"], r["ratio"],
                             r["tgsft_engine_start_seconds"], r["vllm_loop_engine_start_seconds"]] for r in sweep],
                           ["setting", "tok/s A", "tok/s B", "A/B", "start A s", "start B s"]))
        print("compile pay-off:", result["sweep"]["compile_payoff"])
    rows = []
    for i, p in enumerate(pairs, 1):
        a, b = p["a"], p["b"]
        rows.append([i, a["generated_nodes"], a["generated_tokens"], b["generated_tokens"], a["tokens_per_s"],
                     b["tokens_per_s"], p["ratio"], p["ratio_end_to_end"], a["prefix_cache_hit_rate"],
                     b["prefix_cache_hit_rate"], a["engine_starts"], f"{a['dedup_share']:.1%}"])
    print(common.table(rows, ["pair", "nodes", "tokens A", "tokens B", "tok/s A", "tok/s B", "A/B",
                              "A/B end-to-end", "hit rate A", "hit rate B", "engine starts A", "dedup/gen A"]))
    print("medians:", summary)
    print("targets:", targets)
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
