"""Orchestration cost of tree generation per node, with a scripted engine that answers instantly.

    .venv/bin/python benchmarks/bench_orchestration.py                         # 10 k, 100 k, 1 M nodes
    .venv/bin/python benchmarks/bench_orchestration.py --sizes 10000 100000    # skip the 1 M run (~10+ min)

``pipeline.generate.generate`` runs unchanged on a 2-turn tree ``[N, 1, 2, 1]`` (6 N nodes), but with
``benchmarks.scripted.ScriptedEngine`` actors (canned text from each seed) and a ``ScriptedEmbedder`` (random unit
vectors from a hash of the text), so what is timed is Ray Data routing, prompt rendering, filters, question dedup,
Parquet writes and the dialogue table. Each size runs in a fresh subprocess (its own Ray) so peak memory does not
carry over; the driver's peak RSS comes from ``getrusage`` and a 50 ms psutil sampler.
Dedup uses ``method=cluster`` (the documented setting for huge levels; greedy is quadratic in kept questions).

The fixed cost is what a run pays whatever its size: the start-up outside ``generate`` (Ray, the actors, the
embedded model), and inside it the intercept of the time line through the two largest sizes, evaluated for the
smallest run (its wall time minus its nodes times the marginal cost per node). ``summary.projection`` scales the
measured marginal cost and ``PROJECTION``'s engine throughput to 10 M and 100 M nodes on a GPU cluster.

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
# The projection's assumptions (configs/gpu-8b.yaml): questions <= 64 and answers <= 512 new tokens, half the nodes
# each; ~3,000 generated tokens/s per TP=2 replica of an 8B model at 256 sequences.
PROJECTION = {"tokens_per_node": (64 + 512) / 2, "tokens_per_s_per_gpu": 1500, "gpus": 16, "gpus_large": 128}


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
    startup = {}
    t = time.monotonic()
    prepare_embedded(log=lambda *_: None)  # the tokenizer and chat template are real; only the engine is scripted
    startup["model_prepare"] = time.monotonic() - t
    # Other jobs fill this shared machine's memory; Ray's memory monitor would kill the scripted actors.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    t = time.monotonic()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    startup["ray_init"] = time.monotonic() - t
    t = time.monotonic()
    engines = start_engines("scripted", replicas=replicas, num_cpus=0.5, num_gpus=0, engine_kwargs={},
                            engine_cls=ScriptedEngine)
    embedder = ray.remote(ScriptedEmbedder).options(num_cpus=0.5).remote(EMBED_DIM)
    ray.get(embedder.ready.remote())
    startup["actors"] = time.monotonic() - t
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
        "startup_seconds": {k: round(v, 2) for k, v in startup.items()},  # before generate() starts
        "dialogue_and_quality_seconds": round(seconds - sum(v["seconds"] for v in manifest["levels"].values()), 2),
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
    ax1.loglog(n, [0.4 * x / 1000 for x in n], "k--", lw=0.8, label="0.4 ms per node (target at 1 M)")
    ax1.set_xlabel("tree nodes")
    ax1.set_ylabel("seconds")
    ax1.set_title("Time vs tree size (scripted engine)")
    ax1.legend()
    ax2.loglog(n, [r["driver_peak_rss_gib"] for r in runs], "o-", label="driver peak RSS")
    ax2.axhline(1.0, color="k", ls="--", lw=0.8, label="1 GiB (target at 1 M)")
    ax2.set_xlabel("tree nodes")
    ax2.set_ylabel("GiB")
    ax2.set_title("Driver peak memory vs tree size")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _summary(runs: list[dict]) -> dict:
    """Memory and time at 100 k and 1 M, the marginal cost per node, the fixed cost, and the targets."""
    by_size = {r["target_nodes"]: r for r in runs}
    r100k, r1m = by_size.get(100_000), by_size.get(1_000_000)
    out: dict = {
        "driver_peak_rss_gib_100k": r100k and r100k["driver_peak_rss_gib"],
        "driver_peak_rss_gib_1m": r1m and r1m["driver_peak_rss_gib"],
        "ms_per_node_1m": r1m and r1m["ms_per_node"],
    }
    if len(runs) >= 2:
        a, b = runs[-2], runs[-1]
        marginal = (b["seconds"] - a["seconds"]) / (b["generated_nodes"] - a["generated_nodes"])
        small = runs[0]
        out["marginal_ms_per_node"] = round(1000 * marginal, 4)
        out["fixed_cost"] = {
            "run_nodes": small["generated_nodes"],
            "generate_seconds": round(small["seconds"] - marginal * small["generated_nodes"], 2),
            "startup_seconds": small["startup_seconds"],
            "per_level_seconds": {k: v["seconds"] for k, v in small["per_level"].items()},
            "dialogue_and_quality_seconds": small["dialogue_and_quality_seconds"],
        }
        out["projection"] = _projection(marginal, rss_gib=runs[-1]["driver_peak_rss_gib"])
    rss = out["driver_peak_rss_gib_1m"]
    out["targets"] = {
        "driver peak RSS <= 1.0 GiB at 1 M": rss is not None and rss <= 1.0,
        "RSS(1 M) <= 1.15 x RSS(100 k)": rss is not None and r100k is not None
                                          and rss <= 1.15 * out["driver_peak_rss_gib_100k"],
        "<= 0.4 ms per node at 1 M": r1m is not None and r1m["ms_per_node"] <= 0.4,
        "10 k run's fixed cost <= 15 s": "fixed_cost" in out and runs[0]["target_nodes"] == 10_000
                                         and out["fixed_cost"]["generate_seconds"] <= 15,
    }
    return out


def _projection(marginal_s_per_node: float, *, rss_gib: float) -> dict:
    """10 M and 100 M nodes on a GPU cluster: engine time from PROJECTION's throughput, orchestration work from the
    measured marginal cost per node (worker time, beside the engines), driver memory as measured (flat)."""
    p = PROJECTION
    rows = []
    for millions in (10, 100):
        nodes = millions * 1_000_000
        tokens = nodes * p["tokens_per_node"]
        engine_h = tokens / (p["tokens_per_s_per_gpu"] * p["gpus"]) / 3600
        orch_s = nodes * marginal_s_per_node
        rows.append({"nodes_m": millions, "generated_tokens_g": round(tokens / 1e9, 2),
                     "engine_hours": round(engine_h, 1), "engine_days": round(engine_h / 24, 1),
                     "engine_hours_large": round(tokens / (p["tokens_per_s_per_gpu"] * p["gpus_large"]) / 3600, 1),
                     "orchestration_minutes": round(orch_s / 60, 1), "orchestration_hours": round(orch_s / 3600, 2),
                     "orchestration_share": round(orch_s / (engine_h * 3600), 4), "driver_rss_gib": rss_gib})
    return {"assumptions": p, "rows": rows}


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

    summary = _summary(runs)
    result = {"benchmark": "bench_orchestration", "embed_dim": EMBED_DIM, "dedup_method": "cluster",
              "replicas": args.replicas, "machine_before": before, "machine_after": common.machine(),
              "summary": summary, "runs": runs, "failed": failed}
    path = common.save_json(args.name, result)
    if runs:
        _plot(runs, path.with_suffix(".png"))
    rows = [[f"{r['generated_nodes']:,}", r["seconds"], r["ms_per_node"], r["generate_seconds"], r["dedup_seconds"],
             r["other_seconds"], r["driver_peak_rss_gib"], r["driver_peak_rss_sampled_gib"]] for r in runs]
    print(common.table(rows, ["nodes", "seconds", "ms/node", "generate s", "dedup s", "other s",
                              "peak RSS GiB (getrusage)", "peak RSS GiB (sampled)"]))
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
