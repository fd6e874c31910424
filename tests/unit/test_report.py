"""The forgetting report is rebuilt from stored eval JSON alone: its rows carry the eval numbers, its paired
comparisons and prevented share match hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.report import build_report, write_report


def _metric(value: float, stderr: float | None, higher: bool = True) -> dict:
    return {"value": value, "stderr": stderr, "higher_is_better": higher}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _result(model_id: str, *, acc: list[int], gold: list[float], nll: list[float], exact: list[int],
            kl: list[float] | None) -> dict:
    ids = list(range(len(acc)))
    result = {
        "model_id": model_id,
        "tasks": {
            "tgsft_general": {"n": len(acc), "metrics": {"acc": _metric(_mean(acc), 0.1),
                                                         "gold_logprob_per_byte": _metric(_mean(gold), 0.01)},
                              "items": {"ids": ids, "acc": acc, "gold_logprob_per_byte": gold}},
        },
        "retention": {"n_dialogues": len(nll), "n_tokens": 900, "items": {"ids": ["a", "b", "c"], "nll": nll},
                      "metrics": {"nll": _metric(_mean(nll), 0.05, False),
                                  "ppl": _metric(math.exp(_mean(nll)), 0.1, False)}},
        "domain": {"n": len(exact), "primary": "json_exact", "metrics": {"json_exact": _metric(_mean(exact), 0.05)},
                   "items": {"ids": list(range(len(exact))), "json_exact": exact}},
    }
    if kl is not None:
        result["kl"] = {"reference": "base", "n": len(kl), "value": _mean(kl), "stderr": 0.0,
                        "higher_is_better": False, "items": {"ids": [f"g{i}" for i in range(len(kl))], "values": kl}}
    return result


ARMS = {
    "base": dict(acc=[1] * 8 + [0] * 2, gold=[-1.0] * 10, nll=[2.0, 2.0, 2.0], exact=[0] * 5, kl=[0.0] * 4),
    "base_repeat": dict(acc=[1] * 9 + [0], gold=[-1.0] * 10, nll=[2.0, 2.1, 2.0], exact=[0] * 5, kl=None),
    "domain_only": dict(acc=[1] * 4 + [0] * 6, gold=[-2.0] * 10, nll=[2.5, 2.5, 2.5], exact=[1] * 5, kl=[0.2] * 4),
    "tuned": dict(acc=[1] * 6 + [0] * 4, gold=[-1.5] * 10, nll=[1.5, 1.5, 1.5], exact=[1, 1, 1, 1, 0], kl=[0.1] * 4),
}


@pytest.fixture
def run_dir(tmp_path):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    for model_id, kw in ARMS.items():
        (eval_dir / f"{model_id}.json").write_text(json.dumps(_result(model_id, **kw)))
    return tmp_path


def _row(report: dict, task: str, metric: str) -> dict:
    return next(r for r in report["rows"] if r["task"] == task and r["metric"] == metric)


def _cmp(report: dict, variant: str, reference: str, task: str, metric: str) -> dict:
    return next(c for c in report["comparisons"] if (c["variant"], c["reference"], c["task"], c["metric"])
                == (variant, reference, task, metric))


def test_rows_and_summary_carry_eval_numbers(run_dir):
    report = write_report(run_dir)
    out = run_dir / "report"
    assert json.loads((out / "report.json").read_text()) == report
    assert report["variants"] == ["domain_only", "tuned"] and report["noise_floor"] == "base_repeat"

    acc = _row(report, "tgsft_general", "acc")
    assert acc["base"] == {"value": 0.8, "stderr": 0.1}
    assert acc["variants"]["tuned"]["delta"] == pytest.approx(-0.2)
    assert acc["variants"]["tuned"]["retention_pct"] == pytest.approx(75.0)
    # lower-is-better: retention = base / arm
    assert _row(report, "tg_heldout", "nll")["variants"]["domain_only"]["retention_pct"] == pytest.approx(80.0)

    s = report["summary"]["tuned"]
    assert s["domain_metric"] == "json_exact" and s["domain_gain"] == pytest.approx(0.8)
    assert s["heldout_nll_delta"] == pytest.approx(-0.5) and s["kl"] == pytest.approx(0.1)

    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_paired_comparisons_against_base_control_and_noise_floor(run_dir):
    report = build_report({m: _result(m, **kw) for m, kw in ARMS.items()})
    for c in report["comparisons"]:
        assert c["paired"] is True and len(c["ci95"]) == 2 and c["n"] > 0
    c = _cmp(report, "tuned", "base", "tgsft_general", "acc")
    # items 6 and 7 right -> wrong, none the other way: McNemar p = 2 * (1/2)^2
    assert c["delta"] == pytest.approx(-0.2) and c["p_value"] == pytest.approx(0.5)
    assert c["se"] == pytest.approx(math.sqrt((8 * 0.2**2 + 2 * 0.8**2) / 9 / 10))
    assert c["noise_floor"]["delta"] == pytest.approx(0.1)  # base_repeat got item 8 right
    assert _cmp(report, "tuned", "domain_only", "tgsft_general", "acc")["delta"] == pytest.approx(0.2)
    gold = _cmp(report, "tuned", "domain_only", "tgsft_general", "gold_logprob_per_byte")
    assert gold["delta"] == pytest.approx(0.5) and gold["ci95"] == pytest.approx([0.5, 0.5]) and gold["p_value"] is None
    kl = _cmp(report, "domain_only", "base", "generic_dialogues", "kl")
    assert kl["delta"] == pytest.approx(0.2) and kl["noise_floor"] == {"delta": 0.0, "ci95": [0.0, 0.0], "exact": True}
    assert _cmp(report, "base_repeat", "base", "tgsft_general", "acc")["delta"] == pytest.approx(0.1)

    res = report["resolution"]
    assert {r["variant"] for r in res} == {"domain_only", "tuned"}
    assert all(not r["resolves_3_points"] for r in res)  # 10 items resolve nothing like 3 points


def test_prevented_share_headline(run_dir):
    report = write_report(run_dir)
    prevented = report["prevented"]
    # gold log-prob: domain-only drops 1.0 nats/byte on every item, tuned 0.5 -> half prevented on every resample
    assert prevented["metric"] == "gold_logprob_per_byte" and prevented["variant"] == "tuned"
    assert prevented["share"] == pytest.approx(0.5) and prevented["ci95"] == pytest.approx([0.5, 0.5])
    assert prevented["control_forgot"] is True
    by = {(m["task"], m["metric"]): m for m in prevented["by_measure"]}
    assert by[("tgsft_general", "acc")]["share"] == pytest.approx(0.5)  # drops 0.4 vs 0.2
    assert by[("generic_dialogues", "kl")]["share"] == pytest.approx(0.5)  # KL 0.2 vs 0.1
    md = (run_dir / "report" / "report.md").read_text()
    assert "**The TG mix prevented 50 % of domain-only's drop in gold_logprob_per_byte on tgsft_general (95 % CI " \
           "50 % to 50 %).**" in md
    assert "| forgetting | tgsft_general | acc | 0.8000 | -0.4000 [" in md
    assert "it cannot resolve a 3-point change" in md


def test_report_says_when_domain_only_did_not_forget():
    arms = dict(ARMS, domain_only=dict(ARMS["base"], exact=[1] * 5, kl=[0.0] * 4))
    report = build_report({m: _result(m, **kw) for m, kw in arms.items()})
    assert report["prevented"]["control_forgot"] is False and report["prevented"]["share"] is None
    assert "Domain-only did not forget measurably" in report["prevented"]["statement"]
    assert "nothing can be credited" in report["prevented"]["statement"]


def test_report_regenerates_to_custom_dir_and_needs_base(run_dir, tmp_path):
    first = write_report(run_dir, out_dir=tmp_path / "r1")
    assert write_report(run_dir, out_dir=tmp_path / "r2") == first
    (run_dir / "eval" / "base.json").unlink()
    with pytest.raises(FileNotFoundError, match="base model"):
        write_report(run_dir)


def test_report_without_variants_lists_base_only():
    report = build_report({"base": _result("base", **ARMS["base"])})
    assert report["variants"] == [] and report["summary"] == {} and report["prevented"] is None
    assert _row(report, "tgsft_general", "acc")["base"]["value"] == 0.8


def test_report_without_control_has_no_prevented_share():
    report = build_report({m: _result(m, **ARMS[m]) for m in ("base", "tuned")})
    assert report["prevented"] is None
    assert [c["reference"] for c in report["comparisons"]] == ["base"] * len(report["comparisons"])
