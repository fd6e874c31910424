"""Wide, Balance and Deep trees of the same token budget on the embedded model: quality and coverage side by side.

    .venv/bin/python benchmarks/corpus_shapes.py                  # ~10 min on 2 cores
    .venv/bin/python benchmarks/corpus_shapes.py --pairs 96       # a bigger budget per tree

Each tree gets the same number of question/answer pairs (``--pairs``; at most pairs x (48 + 160) generated tokens,
the presets' L_i), so the shapes spend about the same budget: Wide ``[2r/2, 1, 1, 1]`` (r = pairs / 2 roots, 2-turn
dialogues), Balance ``[r, 1, 2, 1]`` (r = pairs / 3), Deep ``[r, 1, 2, 1, 1, 1, 1, 1]`` (r = pairs / 7, 4 turns).
One engine actor and one dedup embedder serve all three trees (started once). Then ``tgsft inspect`` measures them
with the dev eval questions in ``../shared/data/eval`` (ARC-Easy/Challenge dev, PIQA valid, SciQ valid, WinoGrande
dev, GSM8K test) as the coverage reference.

Writes ``benchmarks/results/corpus_shapes.json``, ``.md`` and ``.png`` (the inspect plot).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

EVAL_DIR = common.REPO.parent / "shared" / "data" / "eval"
# preset -> roots for a number of question/answer pairs (pairs per root: wide 2, balance 3, deep 7)
SHAPES = {
    "wide": lambda pairs: [round(pairs / 2), 1, 1, 1],
    "balance": lambda pairs: [round(pairs / 3), 1, 2, 1],
    "deep": lambda pairs: [round(pairs / 7), 1, 2, 1, 1, 1, 1, 1],
}
# (label, quality key) of the Markdown table's headline rows
_HEADLINE = [("kept questions", "questions"), ("dialogues", "dialogues"), ("distinct-2 questions", "distinct_2"),
             ("distinct-2 answers", "answer_distinct_2"), ("self-BLEU questions (0-100)", "self_bleu"),
             ("mean pairwise cosine", "mean_pairwise_cosine"), ("cluster entropy (k=16)", "cluster_entropy"),
             ("near-duplicate rate", "near_duplicate_rate"), ("answers ending a sentence", "complete_sentence_rate")]


def _config(out_root: Path, preset: str, pairs: int):
    from pipeline.config import load_config

    return load_config(None, overrides=[
        f"output_root={out_root}", f"name={preset}", f"tree.preset={preset}",
        f"tree.branching={SHAPES[preset](pairs)}", "engine.enforce_eager=true", "tree.seed=0",
    ])


def _f(x, digits: int = 4) -> str:
    return "–" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def _markdown(result: dict) -> str:
    shapes = list(result["trees"])
    trees, metrics = result["trees"], result["inspect"]["corpora"]
    lines = [
        "# Corpus shapes: Wide vs Balance vs Deep at the same budget",
        "",
        f"Embedded SmolLM2-135M-Instruct, {result['pairs']} question/answer pairs per tree (presets' L_i: questions "
        "48, answers 160 tokens), seed 0, question dedup at cosine 0.9. Coverage reference: "
        f"{sum(result['inspect']['reference'].values())} dev eval questions "
        f"({', '.join(f'{k} {v}' for k, v in result['inspect']['reference'].items())}); a reference question is "
        f"covered when its nearest TG question has cosine >= {result['inspect']['threshold']} (all-MiniLM-L6-v2).",
        "",
        "| | " + " | ".join(shapes) + " |",
        "|---|" + "---|" * len(shapes),
        "| branching | " + " | ".join(str(trees[s]["branching"]) for s in shapes) + " |",
        "| generated tokens | " + " | ".join(str(trees[s]["generated_tokens"]) for s in shapes) + " |",
        "| generation seconds | " + " | ".join(_f(trees[s]["seconds"], 1) for s in shapes) + " |",
    ]
    for label, key in _HEADLINE:
        lines.append(f"| {label} | " + " | ".join(_f(metrics[s]["quality"][key]) for s in shapes) + " |")
    cov = {s: metrics[s]["quality"]["coverage"] for s in shapes}
    lines.append(f"| **coverage (cosine >= {result['inspect']['threshold']})** | "
                 + " | ".join(f"**{_f(cov[s]['value'])}**" for s in shapes) + " |")
    lines.append("| mean nearest cosine | " + " | ".join(_f(cov[s]["mean_nearest"]) for s in shapes) + " |")
    for source in result["inspect"]["reference"]:
        lines.append(f"| coverage {source} | " + " | ".join(_f(cov[s]["by_source"][source]["value"])
                                                           for s in shapes) + " |")
    for t in (0.3, 0.4, 0.6):
        lines.append(f"| coverage at cosine >= {t} | " + " | ".join(
            _f(next(c for x, c in cov[s]["curve"] if abs(x - t) < 1e-6)) for s in shapes) + " |")
    m0, m1 = result["machine_before"], result["machine_after"]
    lines += ["", f"Load average before {m0['load_average']}, after {m1['load_average']} "
              f"({m0['logical_cores']} cores, {m0['cpu_model']}). One sample per shape: the trees are small, so "
              "differences of a few hundredths are within seed-to-seed noise.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=48, help="question/answer pairs per tree (the budget)")
    ap.add_argument("--reference", default=str(EVAL_DIR), help="coverage reference (file or eval data directory)")
    ap.add_argument("--name", default="corpus_shapes")
    ap.add_argument("--work-dir", help="keep the corpora here (default: a temporary directory, removed at the end)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # a shared machine: keep the engine actor alive

    import ray

    from actors.embedder import Embedder
    from actors.engine import start_engines, stop_engines
    from pipeline.generate import engine_options, generate
    from pipeline.inspect_corpus import inspect_corpora
    from pipeline.model import embedder_path, prepare_embedded
    from pipeline.runtime import init_ray

    model_path = str(prepare_embedded())
    before = common.machine()
    tmp = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="tgsft-corpus-shapes-"))
    cfgs = {preset: _config(tmp, preset, args.pairs) for preset in SHAPES}
    first = cfgs["balance"]
    init_ray(num_cpus=first.ray.num_cpus)
    engines = start_engines(model_path, **engine_options(first.model, first.engine))
    embedder = ray.remote(Embedder).options(num_cpus=1).remote(embedder_path(), batch_size=256)
    trees = {}
    try:
        for preset, cfg in cfgs.items():
            print(f"== {preset} {cfg.tree.branching}; load {os.getloadavg()[0]:.1f}", flush=True)
            t0 = time.monotonic()
            manifest = generate(cfg, out_dir=tmp / preset, engines=engines, embedder=embedder,
                                log=lambda s: print("  ", s, flush=True))
            trees[preset] = {"branching": cfg.tree.branching, "max_new_tokens": cfg.tree.max_new_tokens,
                             "generated_tokens": manifest["totals"]["generated_tokens"],
                             "prompt_tokens": manifest["totals"]["prompt_tokens"],
                             "generated_nodes": manifest["totals"]["generated"],
                             "kept_nodes": manifest["totals"]["kept"], "dialogues": manifest["dialogues"],
                             "seconds": round(time.monotonic() - t0, 1), "levels": manifest["levels"]}
    finally:
        ray.kill(embedder)
        stop_engines(engines)
    ray.shutdown()

    out = inspect_corpora([tmp / p for p in SHAPES], reference=args.reference, out_dir=tmp)
    result = {"pairs": args.pairs, "model": "embedded (SmolLM2-135M-Instruct)", "trees": trees, "inspect": out,
              "machine_before": before, "machine_after": common.machine()}
    path = common.save_json(args.name, result)
    (common.RESULTS / f"{args.name}.md").write_text(_markdown(result))
    shutil.copy(tmp / "inspect.png", common.RESULTS / f"{args.name}.png")
    print(f"results: {path}, {args.name}.md, {args.name}.png")
    if not args.work_dir:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
