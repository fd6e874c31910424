"""Experiment tracking's pure parts: config params flattened within MLflow's limits, metric keys MLflow accepts,
generation and eval results turned into metrics; a tracker that is off does nothing, and one whose store fails
warns once and carries on."""

from __future__ import annotations

import subprocess
import sys

from pipeline.config import TGConfig, load_config
from pipeline.tracking import (MAX_KEY, MAX_PARAM_VALUE, Tracker, default_uri, eval_metrics, flatten_params,
                               level_metrics, metric_key, scalar_metrics)


def test_flatten_params_of_the_config():
    flat = flatten_params(TGConfig().model_dump(mode="json"))
    assert flat["train.lr"] == "0.0001" and flat["name"] == "tgsft"
    assert flat["tree.answer.temperature"] == "0.7"
    assert flat["tree.branching"] == "[4, 1, 2, 1]"  # a list stays one value
    assert flat["engine.engine_kwargs"] == "{}" and flat["tracking.tracking_uri"] == "null"
    assert flat["tracking.mlflow"] == "true" and flat["tree.system_prompt"] == "null"
    assert all(isinstance(v, str) for v in flat.values())


def test_long_param_values_are_cut_to_mlflow_limit():
    flat = flatten_params({"tree": {"system_prompt": "x" * 10_000}, "eval": {"tasks": ["t"] * 5000}})
    assert len(flat["tree.system_prompt"]) == MAX_PARAM_VALUE and flat["tree.system_prompt"].endswith("...")
    assert len(flat["eval.tasks"]) == MAX_PARAM_VALUE
    assert flatten_params({"a": "short"}) == {"a": "short"}


def test_metric_keys_mlflow_accepts():
    assert metric_key("eval", "tuned", "tgsft_general", "acc,none") == "eval/tuned/tgsft_general/acc_none"
    assert metric_key("eval", "base", "gsm8k", "exact_match,strict-match") == "eval/base/gsm8k/exact_match_strict-match"
    assert metric_key("", "train", "loss") == "train/loss"
    assert metric_key("org/model", "x") == "org/model/x"
    assert metric_key("/a//b/", "c") == "a/b/c"
    assert len(metric_key("k" * 400)) == MAX_KEY


def test_scalar_and_level_metrics():
    assert scalar_metrics({"a": 1, "b": 2.5, "c": True, "d": "x", "e": [1], "f": float("nan"), "g": None}) == {
        "a": 1.0, "b": 2.5}
    stats = {"parents": 4, "generated": 8, "kept": 6, "dropped": {"near_duplicate": 2}, "generated_tokens": 300,
             "generate_seconds": 3.0, "tokens_per_s": 100.0, "kind": "question"}
    m = level_metrics(stats)
    assert m["generate/generated"] == 8 and m["generate/kept"] == 6 and m["generate/tokens_per_s"] == 100.0
    assert m["generate/dropped_near_duplicate"] == 2 and m["generate/dedup_rate"] == 0.25
    assert "generate/kind" not in m


def test_eval_metrics_of_one_model():
    result = {
        "tasks": {"tgsft_general": {"n": 10, "metrics": {
            "acc": {"value": 0.4, "stderr": 0.1, "higher_is_better": True},
            "acc_norm,none": {"value": 0.5, "stderr": None, "higher_is_better": True}}}},
        "domain": {"n": 4, "metrics": {"field_acc": {"value": 0.75}}, "primary": "json_exact"},
        "retention": {"metrics": {"nll": {"value": 2.0}, "ppl": {"value": 7.39}}},
        "kl": {"n": 4, "value": 0.01, "stderr": 0.001},
        "reference_nll": {"value": float("nan")},
        "seconds": 12.0,
    }
    assert eval_metrics("tuned", result) == {
        "eval/tuned/tgsft_general/acc": 0.4, "eval/tuned/tgsft_general/acc_norm_none": 0.5,
        "eval/tuned/domain/field_acc": 0.75, "eval/tuned/retention/nll": 2.0, "eval/tuned/retention/ppl": 7.39,
        "eval/tuned/kl": 0.01,
    }
    assert eval_metrics("base", {}) == {}


def test_default_store_is_sqlite_in_the_run_dir(tmp_path):
    assert default_uri(tmp_path / "run") == f"sqlite:///{(tmp_path / 'run').resolve()}/mlflow/mlflow.db"


def test_tracking_config_section():
    cfg = load_config(None, overrides=["tracking.mlflow=false", "tracking.experiment=exp", "tracking.tensorboard=true"])
    assert (cfg.tracking.mlflow, cfg.tracking.experiment, cfg.tracking.tensorboard) == (False, "exp", True)
    assert TGConfig().tracking.tracking_uri is None


def test_tracker_that_is_off_does_nothing_and_loads_no_mlflow(tmp_path):
    code = (
        "import sys\nfrom pathlib import Path\nfrom pipeline.tracking import Tracker\n"
        f"t = Tracker.start(run_dir=Path({str(tmp_path)!r}), name='x', mlflow=False, tracking_uri=None, "
        "experiment=None, tensorboard=False)\n"
        "t.params({'a': 1}); t.scoped('train').metrics({'loss': 1.0}, step=1); t.artifacts([Path('/nope')])\n"
        "assert t.run_id is None and t.history('loss') == []\n"
        "t.finish()\n"
        "print(sorted(m for m in ('mlflow', 'tensorboardX', 'ray', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    assert not list(tmp_path.iterdir())


def test_a_failing_store_warns_once_and_the_run_goes_on():
    warnings: list[str] = []
    tracker = Tracker(uri="nosuchscheme://x", run_id="r", prefix="train", warn=warnings.append)
    tracker.metrics({"loss": 1.0}, step=1)
    tracker.metrics({"loss": 0.5}, step=2)
    tracker.params({"a": 1})
    tracker.finish(failed=True)
    assert len(warnings) == 1 and warnings[0].startswith("tracking: logging metrics failed"), warnings
    assert tracker.run_id is None and tracker.history("loss") == []
