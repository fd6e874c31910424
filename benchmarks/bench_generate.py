"""tgsft tree generation vs a plain ``vllm.LLM.generate`` loop over exactly the same prompts, side by side.

    .venv/bin/python benchmarks/bench_generate.py                  # one A/B pair: ~10 min on 2 idle cores, ~1 h at load 40
    .venv/bin/python benchmarks/bench_generate.py --repeats 2      # A B A B, medians reported

Arm A runs ``pipeline.generate.generate`` on the embedded SmolLM2-135M (one engine actor started once per run,
rows routed through Ray Data, filters, question dedup with the real embedder, Parquet levels). Arm B starts a
``vllm.LLM`` in this process with the same engine kwargs (``engine_options``) and, level by level, generates the
prompts tgsft used: rebuilt from the nodes arm A wrote (``pipeline.tree`` paths rendered by ``pipeline.chat``),
with the same seeds, max_tokens, stop strings and sampling settings. Both arms use ``enforce_eager=True``.
Per-node prompt token counts of the two arms are compared to prove the prompts are identical.

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
BRANCHING = [24, 1, 3, 1, 3, 1]  # at most 24+24+72+72+216+216 = 624 nodes (3-turn dialogues); ~530 after drops
MAX_NEW_TOKENS = [48, 96, 48, 96, 48, 96]  # L_i: questions, answers (~30 k generated tokens in all)
_KIND_OF_ROLE = {"user": "question", "assistant": "answer"}


def _config(out_root: Path, branching: list[int], lengths: list[int]):
    from pipeline.config import load_config

    return load_config(None, overrides=[
        f"output_root={out_root}", "name=bench", "tree.preset=null", f"tree.branching={branching}",
        f"tree.max_new_tokens={lengths}", "engine.enforce_eager=true",  # both arms eager: no inductor compile
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
    ax1.set_title("Same tree, same prompts/seeds (enforce_eager)")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1, help="A/B pairs, alternated (A B A B ...)")
    ap.add_argument("--branching", type=str, default=str(BRANCHING))
    ap.add_argument("--max-new-tokens", type=str, default=str(MAX_NEW_TOKENS))
    ap.add_argument("--name", default="bench_generate")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import yaml

    from pipeline.generate import engine_options
    from pipeline.model import prepare_embedded
    from pipeline.runtime import init_ray

    model_path = str(prepare_embedded())
    before = common.machine()
    tmp = Path(tempfile.mkdtemp(prefix="tgsft-bench-gen-"))
    cfg = _config(tmp, yaml.safe_load(args.branching), yaml.safe_load(args.max_new_tokens))
    opts = engine_options(cfg.model, cfg.engine)
    # Other jobs fill this shared machine's memory; Ray's memory monitor would kill (and restart) the engine actor
    # mid-run, which resets its prefix cache and counters and pays a second start.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    init_ray(num_cpus=cfg.ray.num_cpus)
    pairs = []
    for rep in range(args.repeats):
        out_dir = tmp / f"corpus{rep}"
        print(f"pair {rep + 1}/{args.repeats}, arm A (tgsft); load {os.getloadavg()[0]:.1f}")
        a = run_tgsft(cfg, out_dir)
        print(f"pair {rep + 1}/{args.repeats}, arm B (vllm.LLM loop); load {os.getloadavg()[0]:.1f}")
        b = run_raw(cfg, out_dir, model_path, opts)
        pairs.append({"a": a, "b": b, "ratio": round(a["tokens_per_s"] / b["tokens_per_s"], 3),
                      "ratio_end_to_end": round(a["tokens_per_s_end_to_end"] / b["tokens_per_s"], 3),
                      "load_after": [round(x, 2) for x in os.getloadavg()]})

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
        "ratio >= 0.8": summary["ratio"] >= 0.8,
        "one engine start per replica": summary["engine_starts_per_run"] == 1 and not summary["engine_restarts_seen"],
        "prefix-cache hit rate >= 50%": summary["tgsft_prefix_cache_hit_rate"] >= 0.5,
        "dedup <= 10% of generation": summary["dedup_share"] <= 0.10,
    }
    result = {"benchmark": "bench_generate", "branching": cfg.tree.branching, "max_new_tokens": cfg.tree.max_new_tokens,
              "engine_kwargs": opts["engine_kwargs"], "engine_env": opts["env"], "enforce_eager": True,
              "machine_before": before, "machine_after": common.machine(), "summary": summary, "targets": targets,
              "pairs": pairs}
    path = common.save_json(args.name, result)
    _plot(pairs, path.with_suffix(".png"))

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
