"""SFT speed: tgsft's train stage against a plain single-process PyTorch loop on the same batches, side by side.

    .venv/bin/python benchmarks/bench_sft.py                                # the anchor on configs/local.yaml
    .venv/bin/python benchmarks/bench_sft.py --layouts 1x2:0 1x2:2 2x1:2    # + other worker layouts / ZeRO stages

The **tgsft arm** is ``pipeline.train.train`` on ``configs/local.yaml`` as shipped (real Ray Train + DeepSpeed, its
worker layout, ZeRO stage, packing and ``precision: auto``), limited to ``--steps`` optimizer steps. The **torch
arm** (the anchor) is a plain loop in this process: the same model, the same token rows in the same order (tgsft's
own mix, tokenization and packing), the same micro-batches and collation, the precision tgsft chose, the same AdamW
hyper-parameters, LR schedule and gradient clipping; no Ray, no DeepSpeed, ``torch.set_num_threads`` = the
worker's CPUs. Both count real (non-pad) tokens per second after their first optimizer step (warm-up excluded).
MFU = 6 x parameters x tokens/s (attention FLOPs not counted) over the peak matmul throughput this script measures
for the chosen precision at that thread count (the best of 1024- and 2048-square matmuls). The arms alternate
order per repeat; medians.

``--layouts WxC:Z`` adds tgsft runs with W workers of C CPUs at ZeRO stage Z (e.g. ``2x1:2`` was the old default);
``WxC:Z+lora`` trains LoRA adapters (``LoraConfig``'s defaults, r 16, alpha 32, as the study's LoRA arm) instead of
all weights.
The mix is the built-in domain set, plus a TG corpus at ``--tg-ratio`` with ``--corpus``.
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def _config(work: Path, args: argparse.Namespace, *overrides: str):
    from pipeline.config import load_config

    tg = [f"mix.tg_corpus={args.corpus}", f"mix.tg_ratio={args.tg_ratio}"] if args.corpus else ["mix.tg_ratio=0"]
    return load_config(str(common.REPO / "configs" / "local.yaml"), overrides=[
        f"output_root={work}", "name=bench", *tg, f"train.max_steps={args.steps}", f"train.epochs={args.epochs}",
        "train.checkpoint_every=0", "train.max_failures=0", "train.log_every=1000", *overrides,
    ])


def _tgsft(cfg, out: Path) -> dict:
    from pipeline.train import train

    cfg.train.storage_path = str(out / "ckpt")
    load = os.getloadavg()[0]
    train(cfg, out_dir=out, log=lambda s: print("   ", s))
    m = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out)  # checkpoints and export
    keys = ("steps", "tokens", "steady_tokens_per_s", "tokens_per_s", "mfu", "peak_matmul_tflops", "precision",
            "precision_reason", "n_params", "world_size", "threads", "final_loss", "peak_rss_gib")
    return {k: m.get(k) for k in keys} | {"load_before": round(load, 2)}


def _torch_loop(cfg, prep, *, precision: str, steps: int) -> dict:
    """The anchor: tgsft's token rows through a plain PyTorch training loop in this process."""
    from functools import partial

    import torch
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import AutoModelForCausalLM

    from pipeline.schedule import lr_multiplier
    from pipeline.tokenization import collate

    tc = cfg.train
    torch.set_num_threads(int(tc.cpus_per_worker))
    torch.manual_seed(tc.seed)
    model = AutoModelForCausalLM.from_pretrained(prep.model_path, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=tc.weight_decay)
    sched = LambdaLR(opt, partial(lr_multiplier, total_steps=steps, warmup_steps=int(round(tc.warmup_ratio * steps)),
                                  schedule=tc.schedule))
    rows, mb, load = prep.tokens, tc.micro_batch_size, os.getloadavg()[0]
    tokens, t_first, loss = 0, None, None
    for step in range(steps):
        for k in range(tc.grad_accum):
            batch = rows.slice((step * tc.grad_accum + k) * mb, mb).to_pydict()
            inputs = {name: torch.from_numpy(a) for name, a in
                      collate(batch, pad_id=prep.pad_id, packed=tc.packing).items()}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(**inputs).loss / tc.grad_accum
            loss.backward()
            if t_first is not None:
                tokens += sum(len(r) for r in batch["input_ids"])
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if t_first is None:
            t_first = time.monotonic()
    steady = tokens / (time.monotonic() - t_first)
    n_params = sum(p.numel() for p in model.parameters())
    return {"steps": steps, "steady_tokens_per_s": steady, "n_params": n_params, "threads": torch.get_num_threads(),
            "final_loss": float(loss) * tc.grad_accum, "load_before": round(load, 2)}


def _plot(summary: dict, layouts: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["torch loop", "tgsft (local.yaml)"] + [f"tgsft {r['layout']}" for r in layouts]
    values = [summary["torch_tokens_per_s"], summary["tgsft_tokens_per_s"]] + [r["tokens_per_s"] for r in layouts]
    fig, ax = plt.subplots(figsize=(2 + 1.4 * len(names), 4))
    ax.bar(range(len(names)), values, color=["#888"] + ["#3a7"] * (len(names) - 1))
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_ylabel("real tokens / s (median, after step 1)")
    ax.set_title(f"SFT, SmolLM2-135M, {summary['precision']}: tgsft / torch = {summary['ratio']:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4, help="epochs of the mix in the stream (enough for --steps)")
    ap.add_argument("--corpus", help="a TG corpus to mix in at --tg-ratio (default: domain data only)")
    ap.add_argument("--tg-ratio", type=float, default=0.3)
    ap.add_argument("--layouts", nargs="*", default=[],
                    help="extra tgsft runs, WORKERSxCPUS:ZERO (e.g. 2x1:2); a +lora suffix trains LoRA adapters")
    ap.add_argument("--name", default="bench_sft")
    args = ap.parse_args()
    if bad := [s for s in args.layouts if s.partition("+")[2] not in ("", "lora")]:
        ap.error(f"--layouts: unknown variant in {bad} (only +lora)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from pipeline.hardware import matmul_tflops
    from pipeline.runtime import init_ray
    from pipeline.train import prepare_tokens

    before = common.machine()
    work = Path(tempfile.mkdtemp(prefix="tgsft-bench-sft-"))
    init_ray()
    cfg = _config(work, args)
    prep = prepare_tokens(cfg, corpus_dir=None, out_dir=work / "prep", log=lambda s: print("   ", s))
    tgsft_runs, torch_runs, layout_runs = [], [], []
    for rep in range(args.repeats):
        order = ("tgsft", "torch") if rep % 2 == 0 else ("torch", "tgsft")
        for arm in order:
            print(f"repeat {rep + 1}/{args.repeats}: {arm}")
            if arm == "tgsft":
                tgsft_runs.append(_tgsft(_config(work, args), work / f"tgsft-{rep}"))
            else:
                precision = (tgsft_runs or [{"precision": None}])[-1]["precision"]
                if precision is None:  # torch first in this repeat: use the precision tgsft chose before
                    precision = next(r["precision"] for r in tgsft_runs)
                torch_runs.append(_torch_loop(cfg, prep, precision=precision, steps=args.steps) | {"precision": precision})
        for spec in args.layouts:
            layout, _, variant = spec.partition("+")
            (workers, cpus), zero = (s for s in layout.split(":")[0].split("x")), layout.split(":")[1]
            lora = ["train.lora={}"] if variant == "lora" else []  # LoraConfig's defaults: the study's LoRA arm
            run_cfg = _config(work, args, f"train.num_workers={workers}", f"train.cpus_per_worker={cpus}",
                              f"train.zero_stage={zero}", *lora)
            print(f"repeat {rep + 1}/{args.repeats}: tgsft {spec}")
            layout_runs.append(_tgsft(run_cfg, work / f"layout-{spec}-{rep}") | {"layout": spec})

    precision = tgsft_runs[0]["precision"]
    threads = int(cfg.train.cpus_per_worker)
    import torch

    torch.set_num_threads(threads)
    peak = max(matmul_tflops(precision, size=n, min_seconds=0.5) for n in (1024, 2048, 1024, 2048))
    tg, pt = (statistics.median(r["steady_tokens_per_s"] for r in runs) for runs in (tgsft_runs, torch_runs))
    n_params = torch_runs[0]["n_params"]
    anchor = {
        "tgsft_tokens_per_s": round(tg, 1),
        "torch_tokens_per_s": round(pt, 1),
        "ratio": round(tg / pt, 3),
        "mfu": round(6 * n_params * tg / (peak * 1e12), 4),
        "torch_mfu": round(6 * n_params * pt / (peak * 1e12), 4),
        "peak_matmul_tflops": round(peak, 4),
        "precision": precision,
        "precision_reason": tgsft_runs[0]["precision_reason"],
        "threads": threads,
        "n_params": n_params,
        "layout": f"{cfg.train.num_workers}x{cfg.train.cpus_per_worker:g}:{cfg.train.zero_stage}",
        "packing": cfg.train.packing,
        "micro_batch_size": cfg.train.micro_batch_size,
        "max_seq_len": cfg.train.max_seq_len,
        "steps": args.steps,
        "repeats": args.repeats,
    }
    layouts = []
    for spec in args.layouts:
        mine = [r for r in layout_runs if r["layout"] == spec]
        tps = statistics.median(r["steady_tokens_per_s"] for r in mine)
        layouts.append({"layout": spec, "tokens_per_s": round(tps, 1), "ratio_to_torch": round(tps / pt, 3),
                        "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in mine)})
    result = {"benchmark": "bench_sft", "settings": vars(args), "machine_before": before,
              "machine_after": common.machine(), "anchor": anchor, "targets": {"ratio >= 0.85": anchor["ratio"] >= 0.85},
              "layouts": layouts, "runs": {"tgsft": tgsft_runs, "torch": torch_runs, "layouts": layout_runs}}
    path = common.save_json(args.name, result)
    _plot(anchor, layouts, path.with_suffix(".png"))
    shutil.rmtree(work, ignore_errors=True)

    rows = [["torch loop", anchor["layout"].split(":")[0], "-", round(pt, 1), 1.0, anchor["torch_mfu"]],
            ["tgsft", anchor["layout"].split(":")[0], anchor["layout"].split(":")[1], round(tg, 1), anchor["ratio"],
             anchor["mfu"]]]
    rows += [["tgsft", r["layout"].split(":")[0], r["layout"].split(":")[1], r["tokens_per_s"], r["ratio_to_torch"],
              "-"] for r in layouts]
    print(common.table(rows, ["arm", "workers x CPUs", "ZeRO", "tokens/s (median)", "/ torch", "MFU"]))
    print(f"precision {precision} ({anchor['precision_reason']}); peak matmul {peak:.3f} TFLOPS at {threads} threads")
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
