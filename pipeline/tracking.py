"""Experiment tracking: one MLflow run (and optionally TensorBoard event files) per ``tgsft run``.

What a run logs (``tracking.mlflow: true``, the default):

- params: the effective config, flattened to dotted keys (``train.lr``); values longer than MLflow's limit (6000
  characters) are cut and end in ``...``;
- ``generate/<stat>`` per tree level (step = level): parents, generated and kept nodes, tokens, seconds, tokens/s,
  dedup rate, and ``generate/dropped_<reason>``;
- ``train/loss``, ``train/lr``, ``train/tokens_per_s``, ``train/mfu`` per optimizer step (step = optimizer step),
  logged by rank 0 of the Ray Train workers; the control arm (``run.control: domain_only``) logs the same names
  under ``train_domain_only/``, so both curves sit in one run and one chart. The train manifest's totals follow
  as ``train/final_loss``, ``train/steady_tokens_per_s``, ...;
- ``eval/<model>/<task>/<metric>`` for every metric of every evaluated model (lm-eval tasks, ``domain``,
  ``retention``, ``kl``, ``reference_nll``);
- artifacts: ``config.yaml`` and ``report/report.{md,json,png}``.

The default store is a SQLite database in the run directory, ``<run_dir>/mlflow/mlflow.db``, with artifacts under
``<run_dir>/mlflow/artifacts``: no server, and MLflow 3 no longer accepts its old file store without an opt-out.
On a multi-node cluster the training workers write to the same store, so point ``tracking.tracking_uri`` at a
tracking server or keep the run directory on shared storage. View it with::

    mlflow ui --backend-store-uri sqlite:///runs/local/mlflow/mlflow.db

Tracking never stops a run: the first failure is reported once and that tracker stops logging. The pure helpers
(:func:`flatten_params`, :func:`metric_key`, :func:`level_metrics`, :func:`eval_metrics`) import nothing heavy;
mlflow (and tensorboardX) load when a tracker starts.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["Tracker", "default_uri", "eval_metrics", "flatten_params", "level_metrics", "metric_key",
           "scalar_metrics"]

# MLflow's limits (mlflow.utils.validation): parameter value length, key length, entries per log_batch call.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000

_BAD_KEY_CHARS = re.compile(r"[^\w./\- ]")  # MLflow keys: alphanumerics, _ . / - and space


def default_uri(run_dir: Path) -> str:
    """The run's own store: ``sqlite:///<run_dir>/mlflow/mlflow.db`` (absolute path)."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow' / 'mlflow.db'}"


def metric_key(*parts: str) -> str:
    """One MLflow metric or param key from its parts, joined by '/': characters MLflow rejects (such as the comma
    in lm-eval's ``acc,none``) become '_', empty parts are dropped, and the key is cut to 250 characters."""
    cleaned = [_BAD_KEY_CHARS.sub("_", str(p)).strip("/ ") for p in parts]
    key = "/".join(p for p in cleaned if p)
    key = re.sub(r"/{2,}", "/", key)
    return key[:MAX_KEY].rstrip("/")


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def flatten_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config data as MLflow params: dotted keys (``train.lr``), JSON-encoded values (lists stay one
    value), values cut to 6000 characters. An empty mapping is kept as the value ``{}``."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, name))
        else:
            out[metric_key(name)] = _param_value(value)
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def scalar_metrics(data: dict[str, Any]) -> dict[str, float]:
    """The finite numbers among a mapping's top-level values (booleans, strings, lists and mappings left out)."""
    return {str(k): x for k, v in data.items() if (x := _number(v)) is not None}


def level_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """``generate/<stat>`` of one tree level's statistics (as in the corpus manifest's ``levels``)."""
    out = {metric_key("generate", k): v for k, v in scalar_metrics(stats).items()}
    for reason, count in (stats.get("dropped") or {}).items():
        out[metric_key("generate", f"dropped_{reason}")] = float(count)
    generated = stats.get("generated") or 0
    if generated:
        out["generate/dedup_rate"] = (stats.get("dropped") or {}).get("near_duplicate", 0) / generated
    return out


def eval_metrics(model_id: str, result: dict[str, Any]) -> dict[str, float]:
    """``eval/<model>/<task>/<metric>`` of one model's eval result (``<run>/eval/<model>.json``): every lm-eval
    task metric, the domain task's and the retention probe's metrics, and the KL / reference-NLL probes."""
    out: dict[str, float] = {}

    def add(task: str, metrics: dict[str, Any]) -> None:
        for name, m in metrics.items():
            value = _number(m.get("value") if isinstance(m, dict) else m)
            if value is not None:
                out[metric_key("eval", model_id, task, name)] = value

    for task, entry in (result.get("tasks") or {}).items():
        add(task, entry.get("metrics") or {})
    for section in ("domain", "retention"):
        if result.get(section):
            add(section, result[section].get("metrics") or {})
    for probe in ("kl", "reference_nll"):
        value = _number((result.get(probe) or {}).get("value"))
        if value is not None:
            out[metric_key("eval", model_id, probe)] = value
    return out


class _Sinks:
    """The open MLflow client and TensorBoard writer of one process, shared by its scoped trackers."""

    def __init__(self, *, uri: str | None, run_id: str | None, tensorboard_dir: str | None,
                 warn: Callable[[str], None]) -> None:
        self.uri, self.run_id, self.tensorboard_dir, self.warn = uri, run_id, tensorboard_dir, warn
        self.client: Any = None
        self.writer: Any = None
        self.failed = False

    def guard(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.failed:
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001  (tracking must never end a run)
            self.failed = True
            self.warn(f"tracking: {what} failed ({type(e).__name__}: {str(e)[:300]}); logging no more")
            return None

    def mlflow(self) -> Any:
        if self.client is None and self.uri and self.run_id:
            from mlflow.tracking import MlflowClient

            _quiet_loggers()
            self.client = MlflowClient(tracking_uri=self.uri)
        return self.client

    def tensorboard(self) -> Any:
        if self.writer is None and self.tensorboard_dir:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(logdir=self.tensorboard_dir)
        return self.writer


def _quiet_loggers() -> None:
    """MLflow and alembic log store set-up at INFO ("Creating initial MLflow database tables..."): keep it out."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Tracker:
    """Logs params, metrics and artifacts to one MLflow run (and TensorBoard), best-effort.

    A tracker with neither an MLflow run nor a TensorBoard folder does nothing, so callers never branch on whether
    tracking is on. Build one with :meth:`start` on the driver; :meth:`worker_fields` carries the run to a Ray
    Train worker, which rebuilds it with the constructor.

    Args:
        uri: MLflow tracking URI; None disables MLflow.
        run_id: the MLflow run to log to.
        prefix: put before every metric key (``train`` -> ``train/loss``).
        tensorboard_dir: folder for TensorBoard event files; None disables TensorBoard.
        warn: where the one failure message goes.
    """

    def __init__(self, *, uri: str | None = None, run_id: str | None = None, prefix: str = "",
                 tensorboard_dir: str | None = None, warn: Callable[[str], None] = print,
                 _sinks: _Sinks | None = None) -> None:
        self.prefix = prefix
        self._sinks = _sinks or _Sinks(uri=uri, run_id=run_id, tensorboard_dir=tensorboard_dir, warn=warn)

    @classmethod
    def start(cls, *, run_dir: Path, name: str, mlflow: bool, tracking_uri: str | None, experiment: str | None,
              tensorboard: bool, tags: dict[str, str] | None = None, warn: Callable[[str], None] = print) -> Tracker:
        """Open a new MLflow run (creating the experiment if needed) and return its tracker.

        Args:
            run_dir: the run directory (default store and TensorBoard folder live in it).
            name: the MLflow run name.
            mlflow: log to MLflow.
            tracking_uri: MLflow store; None: :func:`default_uri` with artifacts in ``<run_dir>/mlflow/artifacts``.
            experiment: MLflow experiment name; None: ``name``.
            tensorboard: also write TensorBoard event files to ``<run_dir>/tensorboard``.
            tags: MLflow run tags.
            warn: where a failure message goes (once).
        """
        run_dir = Path(run_dir).resolve()
        tb = str(run_dir / "tensorboard") if tensorboard else None
        if not mlflow:
            return cls(tensorboard_dir=tb, warn=warn)
        uri = tracking_uri or default_uri(run_dir)
        sinks = _Sinks(uri=uri, run_id=None, tensorboard_dir=tb, warn=warn)

        def open_run() -> str:
            from mlflow.tracking import MlflowClient

            _quiet_loggers()
            if uri.startswith("sqlite:///"):
                Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=uri)
            exp_name = experiment or name
            exp = client.get_experiment_by_name(exp_name)
            if exp is None:
                location = None if tracking_uri else (run_dir / "mlflow" / "artifacts").as_uri()
                exp_id = client.create_experiment(exp_name, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            sinks.client = client
            return client.create_run(exp_id, run_name=name, tags=tags or {}).info.run_id

        sinks.run_id = sinks.guard("starting the MLflow run", open_run)
        return cls(_sinks=sinks)

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, None when MLflow is off or failed to start."""
        return None if self._sinks.failed else self._sinks.run_id

    @property
    def uri(self) -> str | None:
        return self._sinks.uri

    def scoped(self, prefix: str) -> Tracker:
        """A tracker for the same run whose metric keys start with ``prefix``."""
        return Tracker(prefix=prefix, _sinks=self._sinks)

    def worker_fields(self) -> dict[str, Any]:
        """What a Ray Train worker needs to log to this run (``WorkerConfig`` fields)."""
        return {"tracking_uri": self.uri if self.run_id else None, "tracking_run_id": self.run_id,
                "tracking_prefix": self.prefix, "tensorboard_dir": self._sinks.tensorboard_dir}

    def params(self, data: dict[str, Any]) -> None:
        """Log nested config data as flattened params (:func:`flatten_params`)."""
        flat = flatten_params(data)
        sinks = self._sinks

        def send() -> None:
            if client := sinks.mlflow():
                from mlflow.entities import Param

                items = [Param(k, v) for k, v in flat.items()]
                for i in range(0, len(items), _PARAMS_PER_BATCH):
                    client.log_batch(sinks.run_id, params=items[i:i + _PARAMS_PER_BATCH], synchronous=True)
            if writer := sinks.tensorboard():
                writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat.items()))

        sinks.guard("logging params", send)

    def metrics(self, values: dict[str, float], *, step: int | None = None) -> None:
        """Log metrics (keys get the tracker's prefix; non-finite values are skipped) at ``step`` (default 0)."""
        self._log([(metric_key(self.prefix, k), v, step or 0) for k, v in values.items()])

    def series(self, key: str, points: Iterable[tuple[int, float]]) -> None:
        """Log one metric at many steps at once (``(step, value)`` pairs)."""
        name = metric_key(self.prefix, key)
        self._log([(name, v, s) for s, v in points])

    def _log(self, points: list[tuple[str, Any, int]]) -> None:
        points = [(k, float(v), int(s)) for k, v, s in points if _number(v) is not None]
        sinks = self._sinks

        def send() -> None:
            if client := sinks.mlflow():
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                items = [Metric(k, v, now, s) for k, v, s in points]
                for i in range(0, len(items), _METRICS_PER_BATCH):
                    client.log_batch(sinks.run_id, metrics=items[i:i + _METRICS_PER_BATCH], synchronous=True)
            if writer := sinks.tensorboard():
                for k, v, s in points:
                    writer.add_scalar(k, v, global_step=s)
                writer.flush()

        if points:
            sinks.guard("logging metrics", send)

    def history(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of a logged metric (key without the prefix), in step order; [] without MLflow."""
        sinks = self._sinks

        def read() -> list[tuple[int, float]]:
            client = sinks.mlflow()
            if client is None:
                return []
            rows = client.get_metric_history(sinks.run_id, metric_key(self.prefix, key))
            return sorted((m.step, m.value) for m in rows)

        return sinks.guard("reading metrics", read) or []

    def artifacts(self, paths: Iterable[Path], *, under: str | None = None) -> None:
        """Copy existing files into the run's artifacts (folder ``under``); missing files are skipped."""
        files = [Path(p) for p in paths if Path(p).is_file()]
        sinks = self._sinks

        def send() -> None:
            if client := sinks.mlflow():
                for path in files:
                    client.log_artifact(sinks.run_id, str(path), artifact_path=under)

        if files:
            sinks.guard("logging artifacts", send)

    def close(self) -> None:
        """Flush and close the TensorBoard writer (a worker's last call; the MLflow run stays open)."""
        if self._sinks.writer is not None:
            self._sinks.guard("closing TensorBoard", self._sinks.writer.close)
            self._sinks.writer = None

    def finish(self, *, failed: bool = False) -> None:
        """End the MLflow run (FINISHED or FAILED) and close the TensorBoard writer."""
        sinks = self._sinks

        def end() -> None:
            if client := sinks.mlflow():
                client.set_terminated(sinks.run_id, status="FAILED" if failed else "FINISHED")

        sinks.guard("ending the MLflow run", end)
        self.close()
