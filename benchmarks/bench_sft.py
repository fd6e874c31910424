"""SFT throughput and memory: ZeRO 0 / 2 / 3 x packing on / off on the same realistic mix, side by side.

    .venv/bin/python benchmarks/bench_sft.py --corpus runs/tgsft/corpus       # a TG corpus from `make run`
    .venv/bin/python benchmarks/bench_sft.py --repeats 2 --steps 16

Every configuration runs ``pipeline.train.train`` (real Ray Train + DeepSpeed, 2 CPU workers, the embedded
SmolLM2-135M) on the same mix: the built-in domain set plus the TG corpus at ``mix.tg_ratio`` (default 0.3), for
the same number of optimizer steps. Throughput is real (non-pad) tokens per second of the training loop, as the
workers count it (packed rows hold several examples and no padding; unpacked micro-batches are padded to their
longest row, and the padding is not counted). Peak memory is the largest worker process's peak RSS
(``ru_maxrss``, reported by the workers). Configurations are interleaved (all of repeat 1, then repeat 2, ...) so
load drift on the shared machine hits them alike; medians are reported.

Without ``--corpus`` a small TG corpus is generated first (the local tree, ~3 min on 2 idle cores).
Writes ``benchmarks/results/bench_sft.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def _config(work: Path, corpus: Path, *, zero: int, packing: bool, args: argparse.Namespace):
    from pipeline.config import load_config

    return load_config(str(common.REPO / "configs" / "local.yaml"), overrides=[
        f"output_root={work}", "name=bench", f"mix.tg_corpus={corpus}", f"mix.tg_ratio={args.tg_ratio}",
        f"train.zero_stage={zero}", f"train.packing={str(packing).lower()}", f"train.max_steps={args.steps}",
        f"train.epochs={args.epochs}", f"train.max_seq_len={args.max_seq_len}",
        f"train.micro_batch_size={args.micro_batch_size}", "train.checkpoint_every=0", "train.max_failures=0",
        "train.log_every=1000",
    ])


def _one(work: Path, corpus: Path, zero: int, packing: bool, rep: int, args: argparse.Namespace) -> dict:
    from pipeline.train import train

    cfg = _config(work, corpus, zero=zero, packing=packing, args=args)
    out = work / f"z{zero}-{'packed' if packing else 'padded'}-{rep}"
    cfg.train.storage_path = str(out / "ckpt")
    load = os.getloadavg()[0]
    train(cfg, out_dir=out, log=lambda s: print("   ", s))
    m = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out)  # ~2 GB of checkpoints and export per configuration
    tok = m["tokenization"]
    return {
        "zero_stage": zero, "packing": packing, "repeat": rep, "steps": m["steps"], "tokens": m["tokens"],
        "train_seconds": round(m["train_seconds"], 2), "tokens_per_s": round(m["tokens_per_s"], 1),
        "peak_rss_gib": m["peak_rss_gib"], "rows": tok["rows"], "examples": tok["n_examples"],
        "final_loss": m["final_loss"], "load_before": round(load, 2),
    }


def _plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    zeros = sorted({s["zero_stage"] for s in summary})
    for k, packing in enumerate((False, True)):
        rows = [next(s for s in summary if s["zero_stage"] == z and s["packing"] == packing) for z in zeros]
        xs = [i + (k - 0.5) * 0.4 for i in range(len(zeros))]
        label = "packed" if packing else "padded"
        ax1.bar(xs, [r["tokens_per_s"] for r in rows], 0.4, label=label)
        ax2.bar(xs, [r["peak_rss_gib"] for r in rows], 0.4, label=label)
    for ax, title in ((ax1, "real (non-pad) tokens / s, median"), (ax2, "peak RSS per worker (GiB), median")):
        ax.set_xticks(range(len(zeros)), [f"ZeRO-{z}" for z in zeros])
        ax.set_title(title, fontsize=10)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", help="TG corpus directory (default: generate a small one first)")
    ap.add_argument("--zero", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per configuration")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tg-ratio", type=float, default=0.3)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the mix in the stream (enough for --steps)")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--name", default="bench_sft")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from pipeline.runtime import init_ray

    before = common.machine()
    work = Path(tempfile.mkdtemp(prefix="tgsft-bench-sft-"))
    init_ray()
    corpus = Path(args.corpus).resolve() if args.corpus else None
    if corpus is None:
        from pipeline.config import load_config
        from pipeline.generate import generate

        corpus = work / "corpus"
        generate(load_config(str(common.REPO / "configs" / "local.yaml"), overrides=[f"output_root={work}"]),
                 out_dir=corpus)

    runs = []
    for rep in range(args.repeats):
        for zero in args.zero:
            for packing in (False, True):
                print(f"repeat {rep + 1}/{args.repeats}: ZeRO-{zero}, packing {'on' if packing else 'off'}")
                runs.append(_one(work, corpus, zero, packing, rep, args))

    summary = []
    for zero in args.zero:
        for packing in (False, True):
            mine = [r for r in runs if r["zero_stage"] == zero and r["packing"] == packing]
            summary.append({
                "zero_stage": zero, "packing": packing,
                "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in mine), 1),
                "peak_rss_gib": round(statistics.median(r["peak_rss_gib"] for r in mine), 3),
                "tokens_per_step": round(statistics.median(r["tokens"] / r["steps"] for r in mine)),
            })
    speedup = {}
    for zero in args.zero:
        padded, packed = (next(s for s in summary if s["zero_stage"] == zero and s["packing"] == p)
                          for p in (False, True))
        speedup[f"zero{zero}"] = round(packed["tokens_per_s"] / padded["tokens_per_s"], 3)
    targets = {"packing >= 1.5x unpacked tokens/s (every ZeRO stage)": all(v >= 1.5 for v in speedup.values())}
    result = {"benchmark": "bench_sft", "settings": vars(args) | {"corpus": str(corpus)}, "workers": 2,
              "machine_before": before, "machine_after": common.machine(), "summary": summary,
              "packing_speedup": speedup, "targets": targets, "runs": runs}
    path = common.save_json(args.name, result)
    _plot(summary, path.with_suffix(".png"))
    shutil.rmtree(work, ignore_errors=True)

    rows = [[r["repeat"] + 1, f"ZeRO-{r['zero_stage']}", "on" if r["packing"] else "off", r["steps"], r["tokens"],
             r["train_seconds"], r["tokens_per_s"], r["peak_rss_gib"], r["load_before"]] for r in runs]
    print(common.table(rows, ["repeat", "stage", "packing", "steps", "real tokens", "loop s", "tokens/s",
                              "peak RSS GiB", "load"]))
    print("packing speed-up (packed / padded tokens/s, medians):", speedup)
    print("targets:", targets)
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
