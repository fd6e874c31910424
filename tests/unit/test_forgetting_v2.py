"""The study's verdict writer (benchmarks/forgetting_v2.py) on synthetic per-item scorings with known effects:
seed means, paired comparisons, prevented shares and the rule-based verdict."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
_spec = importlib.util.spec_from_file_location("forgetting_v2", REPO / "benchmarks" / "forgetting_v2.py")
v2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(v2)

TASKS = ["tgsft_arc_easy", "tgsft_sciq"]
N = 600


def _result(correct: np.ndarray, *, nll: float, steps: int | None = None, share: float | None = None) -> dict:
    """A scoring whose primary metric is ``correct`` on both tasks (acc_norm for ARC-Easy, acc for SciQ)."""
    ids = [f"i{k}" for k in range(N)]
    tasks = {t: {"n": N, "metrics": {"acc": {"value": float(correct.mean())},
                                     "acc_norm": {"value": float(correct.mean())}},
                 "items": {"ids": ids, "acc": correct.tolist(), "acc_norm": correct.tolist()}} for t in TASKS}
    out = {"tasks": tasks, "domain_nll": {"metrics": {"nll": {"value": nll, "stderr": 0.01}}},
           "domain": {"metrics": {"token_f1": {"value": 0.3, "stderr": 0.01}}}}
    if steps:
        out["train"] = {"steps": steps, "mix": {"domain_examples": 100, "tg_share_tokens": share, "tg_max_uses": 2}}
    return out


def _arms(tmp_path: Path, *, tg_recovers: bool) -> Path:
    rng = np.random.default_rng(0)
    base = (rng.random(N) < 0.6).astype(float)
    lost = rng.random(N) < 0.25  # domain-only forgets a quarter of the items base knew
    domain = np.where(lost, 0.0, base)
    tg = base.copy() if tg_recovers else domain.copy()
    arms = {"base": _result(base, nll=1.0), "domain": _result(domain, nll=0.80, steps=100),
            "domain-s1": _result(domain, nll=0.82, steps=100),
            "tg_balance": _result(tg, nll=0.84, steps=140, share=0.3),
            "tg_balance-s1": _result(tg, nll=0.86, steps=140, share=0.3),
            "replay_lima": _result(domain, nll=0.83, steps=140, share=0.3)}
    for name, r in arms.items():
        _add_arm(tmp_path, name, r)
    return tmp_path


def _add_arm(arms: Path, name: str, result: dict) -> None:
    (arms / name).mkdir(parents=True)
    with gzip.open(arms / name / "result-dev.json.gz", "wt") as f:  # committed scorings are gzipped
        json.dump(result, f)


def test_labels_and_seed_means(tmp_path):
    assert v2.label_of("domain-s1") == "domain@s1" and v2.label_of("domain_equal_steps") == "domain_equal_steps"
    results = v2.load_results(_arms(tmp_path, tg_recovers=True), "dev")
    assert set(results) == {"base", "domain", "domain@s1", "tg_balance", "tg_balance@s1", "replay_lima"}
    mean, seeds = v2.seed_mean(results, "domain")
    assert seeds == [0, 1]
    assert mean["tasks"]["tgsft_sciq"]["items"]["acc"] == results["domain"]["tasks"]["tgsft_sciq"]["items"]["acc"]


def test_tg_that_keeps_what_base_knew_prevents_forgetting(tmp_path):
    data = v2.summarize(v2.load_results(_arms(tmp_path, tg_recovers=True), "dev"), TASKS)
    comps = {(c["arm"], c["reference"]): c for c in data["comparisons"]}
    drop = comps["domain", "base"]["primary"]
    assert drop["delta"] < 0 and drop["ci95"][1] < 0 and drop["n"] == 2 * N
    assert comps["tg_balance", "base"]["primary"]["delta"] == 0.0
    assert comps["tg_balance", "domain"]["primary"]["delta"] == -drop["delta"]
    assert comps["tg_balance", "domain"]["seeds"] == [0, 1]
    assert data["prevented_share"]["tg_balance"]["share"] == 1.0
    assert data["prevented_share"]["replay_lima"]["share"] == 0.0
    assert data["items_per_task"] == {t: N for t in TASKS}
    entry = next(e for e in data["arms"] if e["name"] == "tg_balance" and e["seed"] == 1)
    assert (entry["steps"], entry["extra_token_share"], entry["extra_source"].startswith("TG Balance")) == (140, 0.3,
                                                                                                          True)
    assert entry["tasks"]["tgsft_arc_easy"]["n"] == N
    assert "TG prevents forgetting by the pre-registered rule" in data["verdict"]
    assert "tg_balance minus replay_lima" in data["verdict"] and "TG did better" in data["verdict"]
    assert "holds at this scale" in data["verdict"] and "100% of domain-only's drop prevented" in data["verdict"]


def test_tg_that_forgets_like_domain_does_no_better(tmp_path):
    data = v2.summarize(v2.load_results(_arms(tmp_path, tg_recovers=False), "dev"), TASKS)
    assert "TG does no better than domain-only" in data["verdict"]
    assert "does not hold at this scale" in data["verdict"]


def test_seed_spread_pairs_seeds_and_matches_the_seed_mean(tmp_path):
    arms = _arms(tmp_path, tg_recovers=True)
    rng = np.random.default_rng(1)
    base = np.array(v2.load_results(arms, "dev")["base"]["tasks"][TASKS[0]]["items"]["acc"])
    s1 = np.where(rng.random(N) < 0.10, 0.0, base)  # seed 1 of domain-only forgets less than seed 0
    with gzip.open(arms / "domain-s1" / "result-dev.json.gz", "wt") as f:
        json.dump(_result(s1, nll=0.82, steps=100), f)
    data = v2.summarize(v2.load_results(arms, "dev"), TASKS)
    comps = {(c["arm"], c["reference"]): c for c in data["comparisons"]}
    dom = comps["domain", "base"]
    d0, d1 = (dom["per_seed"]["seeds"][s]["delta"] for s in ("0", "1"))
    assert d0 < d1 < 0 and abs(d1 - (s1 - base).mean()) < 1e-12
    assert abs(dom["per_seed"]["spread"] - (d1 - d0)) < 1e-12
    assert abs(dom["primary"]["delta"] - (d0 + d1) / 2) < 1e-12  # the seed mean's delta is the mean of the seeds'
    # one-seed arm against a two-seed reference: spread from the reference's seeds; one seed on both sides: none
    lima = comps["replay_lima", "domain"]["per_seed"]["seeds"]
    assert lima["0"]["delta"] == 0.0 and abs(lima["1"]["delta"] - (comps["domain", "base"]["per_seed"]["seeds"]["0"]
                                                                  ["delta"] - d1)) < 1e-12
    assert comps["replay_lima", "base"]["per_seed"] is None
    assert f"(seed 0 {d0:+.3f}, seed 1 {d1:+.3f})" in data["verdict"]
    assert f"(against domain seed 0 {lima['0']['delta']:+.3f}, seed 1 {lima['1']['delta']:+.3f})" in data["verdict"]


def test_main_writes_json_markdown_and_png(tmp_path):
    arms = _arms(tmp_path / "arms", tg_recovers=True)
    assert v2.main(["--arms-dir", str(arms), "--results-dir", str(tmp_path / "out"), "--tasks", *TASKS]) == 0
    data = json.loads((tmp_path / "out" / "forgetting_v2.json").read_text())
    assert {"arms", "items_per_task", "comparisons", "verdict"} <= set(data)
    md = (tmp_path / "out" / "forgetting_v2.md").read_text()
    assert data["verdict"] in md and "| tg_balance | domain |" in md
    assert "| domain | base | " in md and "seed 0 " in md.split("| domain | base | ")[1].split("\n")[0]
    assert (tmp_path / "out" / "forgetting_v2.png").stat().st_size > 5_000


def test_retention_nll_compares_only_on_base_s_probe():
    def probe(ids, nll):
        return {"items": {"ids": ids, "nll": [nll] * len(ids)}, "metrics": {"nll": {"value": nll, "stderr": 0.1}}}

    ones = np.ones(N)
    results = {"base": _result(ones, nll=1.0) | {"retention": probe(["b", "a"], 1.7)},
               "domain": _result(ones, nll=1.2, steps=100) | {"retention": probe(["a", "b"], 3.0),
                                                              "retention_wide": probe(["w"], 2.9)},
               "domain_800x2ep": _result(ones, nll=1.1, steps=55) | {"retention": probe(["old"], 2.2)}}
    arms = {e["name"]: e for e in v2.summarize(results, TASKS)["arms"]}
    assert arms["domain"]["retention_nll"]["probe"] == arms["base"]["retention_nll"]["probe"]  # same ids, any order
    assert arms["domain"]["retention_nll"]["same_probe_as_base"] is True
    assert arms["domain_800x2ep"]["retention_nll"]["same_probe_as_base"] is False  # another corpus's probe
    assert arms["domain"]["retention_wide_nll"]["same_probe_as_base"] is False  # base has no wide probe
    assert v2._cell(arms["domain"]["retention_nll"]) == "3.000 ± 0.100"
    assert v2._cell(arms["domain_800x2ep"]["retention_nll"]) == "–"
    # With the dialogue digest kept, other texts behind the same ids are another probe.
    results["base"]["retention"]["dialogues_sha256"] = "a" * 64
    results["domain"]["retention"]["dialogues_sha256"] = "b" * 64
    arms = {e["name"]: e for e in v2.summarize(results, TASKS)["arms"]}
    assert arms["domain"]["retention_nll"]["same_probe_as_base"] is False


def test_drift_is_paired_per_dialogue_with_the_share_of_domain_only_s_rise_prevented():
    def probe(per_dialogue: list[float], digest: str | None = None) -> dict:
        block = {"items": {"ids": [f"d{k}" for k in range(len(per_dialogue))], "nll": per_dialogue},
                 "metrics": {"nll": {"value": float(np.mean(per_dialogue)), "stderr": 0.1}}}
        return block | ({"dialogues_sha256": digest} if digest else {})

    rng = np.random.default_rng(2)
    base_nll = 2.0 + rng.random(100)  # dialogues differ a lot; the paired difference removes that
    ones = np.ones(N)

    def arm(rise: float, steps: int | None, *, digest: str = "p" * 64, kl: float = 0.0) -> dict:
        return _result(ones, nll=1.0, steps=steps) | {
            "lima_heldout_nll": probe(list(base_nll + rise)), "retention": probe([1.7 + rise] * 24, digest),
            "kl": {"value": kl, "items": {"ids": [f"k{k}" for k in range(32)], "values": [kl] * 32}}}

    results = {"base": arm(0.0, None), "domain": arm(1.0, 100, kl=1.6), "domain@s1": arm(1.2, 100, kl=1.8),
               "tg_balance": arm(0.5, 140, kl=1.2), "tg_balance@s1": arm(0.7, 140, kl=1.2, digest="q" * 64),
               "domain_lora": arm(0.0, 100, kl=0.4)}
    data = v2.summarize(results, TASKS)
    lima = data["drift"]["lima_heldout_nll"]
    assert abs(lima["domain"]["vs_base"]["delta"] - 1.1) < 1e-9  # seed mean of +1.0 and +1.2
    assert lima["domain"]["vs_base"]["ci95"][1] - lima["domain"]["vs_base"]["ci95"][0] < 1e-9  # no pairing noise
    assert abs(lima["tg_balance"]["vs_domain"]["delta"] + 0.5) < 1e-9
    assert abs(lima["tg_balance"]["prevented"]["share"] - 5 / 11) < 1e-9
    assert abs(lima["domain_lora"]["prevented"]["share"] - 1.0) < 1e-9
    assert abs(data["drift"]["kl_to_base"]["domain_lora"]["prevented"]["share"] - (1 - 0.4 / 1.7)) < 1e-9  # domain seed mean 1.7
    # tg_balance seed 1 was scored on another probe than base: no retention comparison for the arm at all
    assert "tg_balance" not in data["drift"]["retention_nll"] and "domain" in data["drift"]["retention_nll"]
    assert "domain_nll" not in data["drift"]  # these scorings keep no per-dialogue domain NLL
    assert "Drift (secondary" in data["verdict"] and "held-out LIMA NLL +1.100" in data["verdict"]
    assert "tg_balance 45% [45%, 45%]" in data["verdict"] and "domain_lora 100%" in data["verdict"]


def test_no_drift_sentence_when_domain_only_did_not_drift(tmp_path):
    data = v2.summarize(v2.load_results(_arms(tmp_path, tg_recovers=True), "dev"), TASKS)
    assert data["drift"] == {} and "Drift" not in data["verdict"]


def test_balance_against_wide_and_equal_steps_sentences(tmp_path):
    arms = _arms(tmp_path / "a", tg_recovers=True)
    domain = np.array(v2.load_results(arms, "dev")["domain"]["tasks"][TASKS[0]]["items"]["acc"])
    _add_arm(arms, "tg_wide", _result(domain, nll=0.85, steps=140, share=0.3))
    _add_arm(arms, "domain_equal_steps", _result(domain, nll=0.90, steps=140))
    data = v2.summarize(v2.load_results(arms, "dev"), TASKS)
    comps = {(c["arm"], c["reference"]): c for c in data["comparisons"]}
    wide = comps["tg_balance", "tg_wide"]["primary"]
    assert wide["delta"] > 0 and wide["ci95"][0] > 0
    assert f"tg_balance minus tg_wide {v2._ci(wide)}, Balance-Tree did better." in data["verdict"]
    assert comps["domain_equal_steps", "domain"]["primary"]["delta"] == 0.0
    assert "apart from TG's effect, so TG's effect is its content's." in data["verdict"]
    same = comps["tg_balance", "domain_equal_steps"]["primary"]
    assert f"tg_balance minus domain_equal_steps {v2._ci(same)}: the TG mix kept more" in data["verdict"]
    # TG without an effect: equal steps have nothing to explain, and Balance against Wide makes no claim
    flat = _arms(tmp_path / "b", tg_recovers=False)
    _add_arm(flat, "tg_wide", _result(domain, nll=0.85, steps=140, share=0.3))
    _add_arm(flat, "domain_equal_steps", _result(domain, nll=0.90, steps=140))
    verdict = v2.summarize(v2.load_results(flat, "dev"), TASKS)["verdict"]
    assert "nothing to credit to its extra steps" in verdict and "credited to the steps" not in verdict
    assert "tg_balance minus tg_wide +0.000 [+0.000, +0.000], no claim (the interval includes 0)." in verdict
