"""One command end to end: generate -> dedup -> corpus -> mix -> train -> serve -> eval -> report.

Reads: a config. Writes everything under ``<output_root>/<name>/``: ``config.yaml``, ``corpus/``, ``train/`` (mix,
checkpoints, exported ``model/``), ``train_domain_only/`` (the control arm, with ``run.control: domain_only``),
``eval/``, ``report/``. Every stage reuses the finished outputs of an earlier attempt with the same config and says
what it reused, so rerunning after a crash finishes the rest.

The control arm trains on the same domain data with ``mix.tg_ratio: 0`` and everything else equal (epochs, learning
rate, warm-up ratio and schedule, batch shape, seeds). Every domain example is seen as often as in the TG arm (once
per epoch), so the control takes fewer optimizer steps: about the TG arm's steps times its domain share of the mix
(70 % with ``mix.tg_ratio: 0.3``). Equal steps instead would give the control extra
passes over the domain data and so more forgetting, which would flatter TG. A ``train.max_steps`` cap is scaled by
the same domain share.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import yaml

from pipeline.config import TGConfig, config_hash
from pipeline.corpus import atomic_write_text, read_json

__all__ = ["run"]


CONTROL_ID = "domain_only"


def _eval_stamp(cfg: TGConfig) -> str:
    """Evaluation results stay valid while everything that shapes the models and the tasks is unchanged."""
    sections = ("model", "tree", "data", "mix", "train", "eval", "run")
    return config_hash({s: getattr(cfg, s).model_dump(mode="json") for s in sections})


def _preflight(cfg: TGConfig, run_dir: Path) -> None:
    """Fail before anything is written or started: another config's corpus in the run directory, bad domain
    files (train and eval), unknown eval tasks or missing eval data."""
    from pipeline.data import load_examples
    from pipeline.evaluate import check_tasks
    from pipeline.generate import check_output

    check_output(cfg, run_dir / "corpus", hint="remove it, or choose another name or output_root")
    for files in (cfg.data.train, cfg.data.eval):
        if files:
            load_examples(files, fmt=cfg.data.format, bad_rows=cfg.data.bad_rows)
    check_tasks(cfg.eval.tasks, cfg.eval.data_dir)
    if cfg.eval.reference_text:
        from pipeline.probes import load_reference_text

        load_reference_text(cfg.eval.reference_text, fmt=cfg.data.format)


def _control_config(cfg: TGConfig, mix_manifest: Path) -> TGConfig:
    """The domain-only control arm's config: ``mix.tg_ratio`` 0, a ``max_steps`` cap scaled by the TG arm's
    domain share (``mix_manifest``: its mix manifest), everything else the same (see the module docstring)."""
    control = cfg.model_copy(deep=True)
    control.mix.tg_ratio = 0.0
    if cfg.train.max_steps:
        stats = read_json(mix_manifest) or {}
        rows = stats.get("domain_examples", 0) + stats.get("tg_examples", 0)
        share = stats.get("domain_examples", 0) / rows if rows else 1.0 - cfg.mix.tg_ratio
        control.train.max_steps = max(1, round(cfg.train.max_steps * share))
    return control


def run(cfg: TGConfig, *, config_path: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the whole pipeline in ``cfg.run_dir`` and return the report.

    Args:
        cfg: the run config.
        config_path: the file it came from (recorded in the run directory).
        log: where progress lines go.

    Raises:
        ValueError: bad domain data (file, row, field), unknown eval tasks, or a run directory holding another
            tree config's corpus; found before anything is written.
        OSError: missing files, permissions or a full disk (naming the path).
    """
    from pipeline.evaluate import evaluate
    from pipeline.generate import generate
    from pipeline.model import resolve_model
    from pipeline.report import write_report
    from pipeline.runtime import init_ray
    from pipeline.train import train

    t0 = time.monotonic()
    run_dir = cfg.run_dir.resolve()
    _preflight(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    header = f"# effective config of run {cfg.name}" + (f" (from {config_path})" if config_path else "") + "\n"
    atomic_write_text(run_dir / "config.yaml", header + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard_host=cfg.ray.dashboard_host)
    timings: dict[str, float] = {}

    def stage(name: str, fn):
        log(f"== {name}")
        start = time.monotonic()
        out = fn()
        timings[name] = round(time.monotonic() - start, 1)
        return out

    corpus = run_dir / "corpus"
    stage("generate", lambda: generate(cfg, out_dir=corpus, log=log))
    tuned = stage("train", lambda: train(cfg, corpus_dir=corpus, out_dir=run_dir / "train", log=log))
    models = {"base": resolve_model(cfg.model.source, cache=cfg.model.cache_dir, log=log), "tuned": str(tuned)}
    if cfg.run.control == CONTROL_ID:
        control = _control_config(cfg, run_dir / "train" / "mix" / "manifest.json")
        models[CONTROL_ID] = str(stage("train_domain_only", lambda: train(
            control, corpus_dir=corpus, out_dir=run_dir / "train_domain_only", log=log)))

    eval_dir = run_dir / "eval"
    stamp = _eval_stamp(cfg)
    done = read_json(eval_dir / "_SUCCESS")
    if done and done.get("stamp") == stamp and all((eval_dir / f"{m}.json").is_file() for m in models):
        log(f"== eval: reusing the results in {eval_dir}")
    else:
        shutil.rmtree(eval_dir, ignore_errors=True)  # results of models this config no longer has must not linger
        stage("eval", lambda: evaluate(cfg, models=models, base_url=None, out_dir=eval_dir, corpus_dir=corpus))
        atomic_write_text(eval_dir / "_SUCCESS", f'{{"stamp": "{stamp}"}}\n')

    report = stage("report", lambda: write_report(run_dir))
    md = (run_dir / "report" / "report.md").read_text(encoding="utf-8")
    log(md)
    log(f"run {cfg.name} finished in {time.monotonic() - t0:.0f} s ({', '.join(f'{k} {v} s' for k, v in timings.items())})")
    arms = "train/model/, train_domain_only/model/" if CONTROL_ID in models else "train/model/"
    log(f"files: {run_dir}/ (corpus/, {arms}, eval/, report/report.{{json,md,png}})")
    return report
