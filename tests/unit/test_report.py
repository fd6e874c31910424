"""The forgetting report is rebuilt from stored eval JSON alone and carries its numbers."""

from __future__ import annotations

import json

import pytest

from pipeline.report import build_report, write_report


def _metric(value: float, stderr: float | None, higher: bool = True) -> dict:
    return {"value": value, "stderr": stderr, "higher_is_better": higher}


def _result(model_id: str, *, arc: float, general: float, nll: float, json_exact: float) -> dict:
    return {
        "model_id": model_id,
        "tasks": {
            "tgsft_arc_easy": {"n": 570, "metrics": {"acc": _metric(arc, 0.02), "acc_norm": _metric(arc - 0.05, 0.02)}},
            "tgsft_general": {"n": 32, "metrics": {"acc": _metric(general, 0.08)}},
        },
        "retention": {"n_dialogues": 8, "n_tokens": 900,
                      "metrics": {"nll": _metric(nll, 0.05, False), "ppl": _metric(2.718 ** nll, 0.1, False)}},
        "domain": {"n": 60, "primary": "json_exact",
                   "metrics": {"json_exact": _metric(json_exact, 0.05), "token_f1": _metric(0.5, 0.03)}},
    }


@pytest.fixture
def run_dir(tmp_path):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    for model_id, kw in {
        "base": dict(arc=0.50, general=0.75, nll=2.0, json_exact=0.05),
        "tuned": dict(arc=0.45, general=0.75, nll=2.5, json_exact=0.80),
        "tuned_tg": dict(arc=0.49, general=0.78, nll=2.1, json_exact=0.75),
    }.items():
        (eval_dir / f"{model_id}.json").write_text(json.dumps(_result(model_id, **kw)))
    return tmp_path


def _row(report: dict, task: str, metric: str) -> dict:
    return next(r for r in report["rows"] if r["task"] == task and r["metric"] == metric)


def test_report_files_carry_eval_numbers(run_dir):
    report = write_report(run_dir)
    out = run_dir / "report"
    assert json.loads((out / "report.json").read_text()) == report
    assert report["variants"] == ["tuned", "tuned_tg"]

    arc = _row(report, "tgsft_arc_easy", "acc")
    assert arc["base"] == {"value": 0.50, "stderr": 0.02}
    assert arc["variants"]["tuned"]["delta"] == pytest.approx(-0.05)
    assert arc["variants"]["tuned"]["retention_pct"] == pytest.approx(90.0)
    assert arc["variants"]["tuned_tg"]["retention_pct"] == pytest.approx(98.0)
    # lower-is-better: retention = base / variant
    assert _row(report, "tg_heldout", "nll")["variants"]["tuned"]["retention_pct"] == pytest.approx(80.0)

    s = report["summary"]["tuned"]
    assert s["general_retention_pct"] == pytest.approx((90.0 + 100.0) / 2)  # primary acc of both tasks
    assert s["domain_metric"] == "json_exact"
    assert s["domain_gain"] == pytest.approx(0.75)
    assert s["heldout_nll_delta"] == pytest.approx(0.5)

    md = (out / "report.md").read_text()
    assert "| tgsft_arc_easy | acc * | 0.5000 ± 0.0200 | 0.4500 ± 0.0200 | -0.0500 | 90.0 % |" in md
    assert "| tuned | 95.0 % | json_exact | 0.0500 | 0.8000 | 0.7500 | 0.5000 |" in md
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_regenerates_to_custom_dir_and_needs_base(run_dir, tmp_path):
    first = write_report(run_dir, out_dir=tmp_path / "r1")
    assert write_report(run_dir, out_dir=tmp_path / "r2") == first
    (run_dir / "eval" / "base.json").unlink()
    with pytest.raises(FileNotFoundError, match="base model"):
        write_report(run_dir)


def test_report_without_variants_lists_base_only():
    report = build_report({"base": _result("base", arc=0.5, general=0.7, nll=2.0, json_exact=0.1)})
    assert report["variants"] == [] and report["summary"] == {}
    assert _row(report, "tgsft_general", "acc")["base"]["value"] == 0.7
