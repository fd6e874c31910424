"""One command end to end: generate -> dedup -> corpus -> mix -> train -> serve -> eval -> report.

Reads: a config. Writes everything under ``<output_root>/<name>/``: ``config.yaml``, ``corpus/``, ``train/`` (mix,
checkpoints, exported ``model/``), ``train_domain_only/`` (the control arm, with ``run.control: domain_only``),
``eval/``, ``report/``, ``logs/tgsft.log`` (what the libraries print, :mod:`pipeline.console`) and ``mlflow/`` (the
run's MLflow store, :mod:`pipeline.tracking`). Every stage reuses the finished outputs of an earlier attempt with
the same config and says what it reused, so rerunning after a crash finishes the rest; each attempt is its own
MLflow run.

The control arm trains on the same domain data with ``mix.tg_ratio: 0`` and everything else equal (epochs, learning
rate, warm-up ratio and schedule, batch shape, seeds). Every domain example is seen as often as in the TG arm (once
per epoch), so the control takes fewer optimizer steps: about the TG arm's steps times its domain share of the mix
(70 % with ``mix.tg_ratio: 0.3``). Equal steps instead would give the control extra
passes over the domain data and so more forgetting, which would flatter TG. A ``train.max_steps`` cap is scaled by
the same domain share.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from pipeline.cachekey import stage_key
from pipeline.config import TGConfig
from pipeline.console import Console
from pipeline.corpus import atomic_write_text, read_json
from pipeline.tracking import Tracker, eval_metrics, level_metrics, scalar_metrics

__all__ = ["run"]


CONTROL_ID = "domain_only"


def _eval_stamp(cfg: TGConfig) -> str:
    """Evaluation results stay valid while everything that shapes the models and the tasks is unchanged (speed-only
    fields such as ``eval.num_concurrent`` or the Serve port do not count)."""
    return stage_key(cfg, "model", "tree", "data", "mix", "train", "eval", "run")


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
    check_tasks(cfg.eval.tasks, cfg.eval.data_dir, cfg.eval.include_path)
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
        domain = stats.get("domain_examples", 0) * stats.get("epochs", 1)
        rows = domain + stats.get("tg_examples", 0)
        share = domain / rows if rows else 1.0 - cfg.mix.tg_ratio
        control.train.max_steps = max(1, round(cfg.train.max_steps * share))
    return control


def _headline(md: str) -> str:
    """The report's title and headline section (what TG saved, per measure and arm): what the console shows."""
    sections = md.split("\n## ")
    if len(sections) > 1 and sections[1].startswith("Headline"):
        return "\n## ".join(sections[:2]).rstrip()
    return md.rstrip()


def _start_tracking(cfg: TGConfig, run_dir: Path, config_path: str | None, log: Callable[[str], None]) -> Tracker:
    """This attempt's MLflow run (``cfg.tracking``), with the effective config as its params."""
    tc = cfg.tracking
    tracker = Tracker.start(run_dir=run_dir, name=cfg.name, mlflow=tc.mlflow, tracking_uri=tc.tracking_uri,
                            experiment=tc.experiment, tensorboard=tc.tensorboard, warn=log,
                            tags={"tgsft.run_dir": str(run_dir), "tgsft.config": config_path or "defaults"})
    tracker.params(cfg.model_dump(mode="json"))
    if tracker.run_id:
        log(f"tracking: MLflow run {tracker.run_id} in {tracker.uri}")
    return tracker


def _track_training(tracker: Tracker, manifest_path: Path) -> None:
    """The train manifest's totals as ``<arm>/summary/...``, and its per-step losses for any step the workers did
    not log (an export reused from an earlier attempt)."""
    manifest = read_json(manifest_path) or {}
    tracker.scoped(f"{tracker.prefix}/summary").metrics(scalar_metrics(manifest))
    logged = {step for step, _ in tracker.history("loss")}
    tracker.series("loss", [(step, loss) for step, loss in enumerate(manifest.get("losses") or [], start=1)
                            if step not in logged])


def run(cfg: TGConfig, *, config_path: str | None = None, verbose: bool = False) -> dict:
    """Run the whole pipeline in ``cfg.run_dir`` and return the report.

    Args:
        cfg: the run config.
        config_path: the file it came from (recorded in the run directory).
        verbose: show every library's output; otherwise the console shows the pipeline's own progress and the
            rest goes to ``<run_dir>/logs/tgsft.log`` (:mod:`pipeline.console`).

    Raises:
        ValueError: bad domain data (file, row, field), unknown eval tasks, or a run directory holding another
            tree config's corpus; found before anything is written.
        OSError: missing files, permissions or a full disk (naming the path).
    """
    run_dir = cfg.run_dir.resolve()
    _preflight(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with Console(run_dir / "logs" / "tgsft.log", verbose=verbose) as console:
        tracker = _start_tracking(cfg, run_dir, config_path, console.log)
        try:
            report = _run(cfg, run_dir, config_path=config_path, console=console, tracker=tracker)
        except BaseException:
            tracker.finish(failed=True)
            raise
        finally:
            _leave_ray()
        tracker.finish()
        return report


def _leave_ray() -> None:
    """Shut Ray down (or leave the joined cluster) while library output still goes to the log file: Ray forwards
    its actors' last lines (engines stopping) for a while after they are told to stop."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _run(cfg: TGConfig, run_dir: Path, *, config_path: str | None, console: Console, tracker: Tracker) -> dict:
    from pipeline.evaluate import evaluate
    from pipeline.generate import generate
    from pipeline.model import resolve_model
    from pipeline.report import write_report
    from pipeline.runtime import init_ray
    from pipeline.storage import check_shared_storage
    from pipeline.train import train

    t0 = time.monotonic()
    log = console.log
    header = f"# effective config of run {cfg.name}" + (f" (from {config_path})" if config_path else "") + "\n"
    atomic_write_text(run_dir / "config.yaml", header + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard_host=cfg.ray.dashboard_host)
    check_shared_storage(cfg, log=log)  # on a multi-node cluster: every node sees the run's folders
    timings: dict[str, float] = {}

    def stage(name: str, fn):
        log(f"== {name}")
        start = time.monotonic()
        out = fn()
        timings[name] = round(time.monotonic() - start, 1)
        return out

    corpus = run_dir / "corpus"
    manifest = stage("generate", lambda: generate(cfg, out_dir=corpus, log=log))
    for level, stats in sorted(manifest.get("levels", {}).items(), key=lambda kv: int(kv[0])):
        tracker.metrics(level_metrics(stats), step=int(level))
    tracker.scoped("generate/total").metrics(scalar_metrics(manifest.get("totals") or {}) | scalar_metrics(manifest))
    tracker.scoped("corpus").metrics(scalar_metrics(manifest.get("quality") or {}))

    def train_arm(name: str, arm_cfg: TGConfig) -> str:
        """Train one arm into ``<run_dir>/<name>``; its metrics go under ``<name>/``."""
        arm_tracker = tracker.scoped(name)
        model = stage(name, lambda: train(arm_cfg, corpus_dir=corpus, out_dir=run_dir / name, log=log,
                                          tracker=arm_tracker, on_step=console.training(name)))
        _track_training(arm_tracker, run_dir / name / "manifest.json")
        return str(model)

    models = {"base": resolve_model(cfg.model, log=log),
              "tuned": train_arm("train", cfg)}
    if cfg.run.control == CONTROL_ID:
        control = _control_config(cfg, run_dir / "train" / "mix" / "manifest.json")
        models[CONTROL_ID] = train_arm("train_domain_only", control)

    eval_dir = run_dir / "eval"
    stamp = _eval_stamp(cfg)
    done = read_json(eval_dir / "_SUCCESS")
    if done and done.get("stamp") == stamp and all((eval_dir / f"{m}.json").is_file() for m in models):
        log(f"== eval: reusing the results in {eval_dir}")
    else:
        shutil.rmtree(eval_dir, ignore_errors=True)  # results of models this config no longer has must not linger
        stage("eval", lambda: evaluate(cfg, models=models, base_url=None, out_dir=eval_dir, corpus_dir=corpus,
                                       log=log))
        atomic_write_text(eval_dir / "_SUCCESS", f'{{"stamp": "{stamp}"}}\n')
    for path in sorted(eval_dir.glob("*.json")):
        tracker.metrics(eval_metrics(path.stem, read_json(path) or {}))

    report = stage("report", lambda: write_report(run_dir))
    tracker.artifacts([run_dir / "config.yaml"])
    tracker.artifacts([run_dir / "report" / f"report.{ext}" for ext in ("md", "json", "png")], under="report")
    tracker.scoped("seconds").metrics(timings)
    log(_headline((run_dir / "report" / "report.md").read_text(encoding="utf-8")))
    stages = ", ".join(f"{k} {v} s" for k, v in timings.items())
    log(f"run {cfg.name} finished in {time.monotonic() - t0:.0f} s ({stages})")
    arms = "train/model/, train_domain_only/model/" if CONTROL_ID in models else "train/model/"
    log(f"files: {run_dir}/ (corpus/, {arms}, eval/, report/report.{{json,md,png}} (the full report), "
        "logs/tgsft.log, mlflow/)")
    return report
