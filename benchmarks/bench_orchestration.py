"""Orchestration cost of tree generation per node, with a scripted engine that answers instantly.

    .venv/bin/python benchmarks/bench_orchestration.py                         # 10 k, 100 k, 1 M nodes
    .venv/bin/python benchmarks/bench_orchestration.py --sizes 10000 100000    # skip the 1 M run (~10+ min)

``pipeline.generate.generate`` runs unchanged on a 2-turn tree ``[N, 1, 2, 1]`` (6 N nodes), but with
``benchmarks.scripted.ScriptedEngine`` actors (canned text from each seed) and a ``ScriptedEmbedder`` (random unit
vectors from a hash of the text), so what is timed is Ray Data routing, prompt rendering, filters, question dedup,
Parquet writes and the dialogue table. Each size runs in a fresh subprocess (its own Ray) so peak memory does not
carry over; the driver's peak RSS comes from ``getrusage`` and a 50 ms psutil sampler.
Dedup uses ``method=cluster`` (the documented setting for huge levels; greedy is quadratic in kept questions).

Writes ``benchmarks/results/bench_orchestration.json`` and ``.png`` (log-log time and memory vs tree size).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SIZES = [10_000, 100_000, 1_000_000]  # target node counts; the tree [N, 1, 2, 1] has 6 N nodes
EMBED_DIM = 384  # all-MiniLM-L6-v2's width, so the kept-question memory is realistic


class _RssSampler(threading.Thread):
    """Samples this process's RSS every ``period`` seconds; ``peak`` in bytes."""

    def __init__(self, period: float = 0.05):
        super().__init__(daemon=True)
        import psutil

        self._proc, self._period, self.peak, self._done = psutil.Process(), period, 0, threading.Event()
        self.peak_at = time.monotonic()

    def run(self) -> None:
        while not self._done.is_set():
            rss = self._proc.memory_info().rss
            if rss > self.peak:
                self.peak, self.peak_at = rss, time.monotonic()
            time.sleep(self._period)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def child(nodes: int, out_json: Path, replicas: int) -> None:
    """One size in this (fresh) process: start Ray and the scripted actors, time generate(), record memory."""
    import ray

    from actors.engine import start_engines
    from pipeline.config import load_config
    from pipeline.generate import generate
    from pipeline.model import prepare_embedded
    from scripted import ScriptedEmbedder, ScriptedEngine

    n1 = max(1, round(nodes / 6))
    out_root = Path(tempfile.mkdtemp(prefix="tgsft-bench-orch-"))
    cfg = load_config(None, overrides=[
        f"output_root={out_root}", "name=orch", "tree.preset=null", f"tree.branching=[{n1},1,2,1]",
        "tree.max_new_tokens=[48,160,48,160]", "tree.dedup.method=cluster", f"engine.replicas={replicas}",
    ])
    prepare_embedded(log=lambda *_: None)  # the tokenizer and chat template are real; only the engine is scripted
    # Other jobs fill this shared machine's memory; Ray's memory monitor would kill the scripted actors.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    engines = start_engines("scripted", replicas=replicas, num_cpus=0.5, num_gpus=0, engine_kwargs={},
                            engine_cls=ScriptedEngine)
    embedder = ray.remote(ScriptedEmbedder).options(num_cpus=0.5).remote(EMBED_DIM)
    ray.get(embedder.ready.remote())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampler = _RssSampler()
    sampler.start()
    t0 = time.monotonic()
    timeline = []  # (seconds, driver RSS GiB, log line): where the memory goes, level by level

    def log(line: str) -> None:
        timeline.append([round(time.monotonic() - t0, 2), round(sampler._proc.memory_info().rss / 2**30, 3), line])
        print(f"   [{timeline[-1][0]:.1f} s, {timeline[-1][1]:.2f} GiB] {line}", flush=True)

    manifest = generate(cfg, out_dir=out_root / "corpus", engines=engines, embedder=embedder, log=log)
    seconds = time.monotonic() - t0
    sampled = sampler.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tot = manifest["totals"]
    result = {
        "target_nodes": nodes,
        "branching": cfg.tree.branching,
        "generated_nodes": tot["generated"],
        "kept_nodes": tot["kept"],
        "dialogues": manifest["dialogues"],
        "seconds": round(seconds, 2),
        "ms_per_node": round(1000 * seconds / tot["generated"], 4),
        "generate_seconds": tot["generate_seconds"],  # prompts + Ray Data + scripted engine, summed over levels
        "dedup_seconds": tot["dedup_seconds"],
        "other_seconds": round(seconds - tot["generate_seconds"] - tot["dedup_seconds"], 2),  # filters, Parquet, ...
        "driver_peak_rss_gib": round(peak / 2**30, 3),
        "driver_peak_rss_sampled_gib": round(sampled / 2**30, 3),
        "driver_rss_before_gib": round(rss_before / 2**30, 3),
        "per_level": {k: {f: v[f] for f in ("generated", "kept", "generate_seconds", "dedup_seconds", "seconds")}
                      for k, v in manifest["levels"].items()},
        "peak_at_seconds": round(sampler.peak_at - t0, 2),
        "timeline": timeline,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    out_json.write_text(json.dumps(result, indent=2))
    ray.shutdown()


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["generated_nodes"] for r in runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.loglog(n, [r["seconds"] for r in runs], "o-", label="generate() wall time")
    ax1.loglog(n, [x / 1000 for x in n], "k--", lw=0.8, label="1 ms per node (target)")
    ax1.set_xlabel("tree nodes")
    ax1.set_ylabel("seconds")
    ax1.set_title("Time vs tree size (scripted engine)")
    ax1.legend()
    ax2.loglog(n, [r["driver_peak_rss_gib"] for r in runs], "o-", label="driver peak RSS")
    ax2.axhline(2.0, color="k", ls="--", lw=0.8, label="2 GiB (target at 1 M)")
    ax2.set_xlabel("tree nodes")
    ax2.set_ylabel("GiB")
    ax2.set_title("Driver peak memory vs tree size")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    ap.add_argument("--replicas", type=int, default=1, help="scripted engine actors")
    ap.add_argument("--timeout", type=float, default=1500, help="seconds per size before giving up")
    ap.add_argument("--name", default="bench_orchestration")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.child_out, args.replicas)
        return

    before = common.machine()
    runs, failed = [], []
    for nodes in args.sizes:
        out = Path(tempfile.mkdtemp(prefix="tgsft-bench-orch-res-")) / "result.json"
        print(f"{nodes:,} nodes (fresh subprocess); load {os.getloadavg()[0]:.1f}", flush=True)
        cmd = [sys.executable, __file__, "--child", str(nodes), "--child-out", str(out), "--replicas", str(args.replicas)]
        try:
            subprocess.run(cmd, check=True, timeout=args.timeout)
            runs.append(json.loads(out.read_text()))
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            print(f"  {nodes:,} nodes failed: {e}")
            failed.append({"target_nodes": nodes, "error": str(e)})
            break

    largest = runs[-1] if runs else None
    targets = {
        "<= 1 ms per node (every size)": all(r["ms_per_node"] <= 1.0 for r in runs),
        "driver peak RSS <= 2 GiB at 1 M": (largest["driver_peak_rss_gib"] <= 2.0
                                            if largest and largest["generated_nodes"] >= 900_000 else None),
    }
    result = {"benchmark": "bench_orchestration", "embed_dim": EMBED_DIM, "dedup_method": "cluster",
              "replicas": args.replicas, "machine_before": before, "machine_after": common.machine(),
              "runs": runs, "failed": failed, "targets": targets}
    path = common.save_json(args.name, result)
    if runs:
        _plot(runs, path.with_suffix(".png"))
    rows = [[f"{r['generated_nodes']:,}", r["seconds"], r["ms_per_node"], r["generate_seconds"], r["dedup_seconds"],
             r["other_seconds"], r["driver_peak_rss_gib"], r["driver_peak_rss_sampled_gib"]] for r in runs]
    print(common.table(rows, ["nodes", "seconds", "ms/node", "generate s", "dedup s", "other s",
                              "peak RSS GiB (getrusage)", "peak RSS GiB (sampled)"]))
    print("targets:", targets)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
