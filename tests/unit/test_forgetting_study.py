"""The forgetting study's pure helpers (benchmarks/forgetting.py): LIMA parsing and split, arm names with seeds, the
equal-steps budget, the arm configs and the paired summary. Nothing is trained or served."""

from __future__ import annotations

import importlib.util
import json
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("forgetting", REPO / "benchmarks" / "forgetting.py")
forgetting = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(forgetting)

TASKS = ["tgsft_arc_easy", "tgsft_piqa"]


def _lima(tmp_path: Path) -> Path:
    rows = [{"conversations": ["What is 2 + 2?", "4."], "source": "stackexchange"},
            {"conversations": ["Hi", "Hello!", "How are you?", "Fine, thanks."], "source": "multi_turn"},
            {"conversations": ["Tell me a joke", "Why did the chicken...", "Another one?"], "source": "multi_turn"}]
    path = tmp_path / "lima_data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lima_dialogues_alternate_roles_and_end_with_the_assistant(tmp_path):
    rows = forgetting.lima_dialogues(_lima(tmp_path))
    assert [r["dialogue_id"] for r in rows] == ["lima-0000", "lima-0001", "lima-0002"]
    assert [len(r["messages"]) for r in rows] == [2, 4, 2]  # the odd row loses its trailing user string
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
    assert rows[2]["messages"][-1]["content"] == "Why did the chicken..."


def test_lima_split_is_disjoint_and_deterministic():
    rows = [{"dialogue_id": f"lima-{i:04d}", "messages": []} for i in range(50)]
    held, replay = forgetting.split_lima(rows, n_heldout=10)
    ids_h, ids_r = {r["dialogue_id"] for r in held}, {r["dialogue_id"] for r in replay}
    assert len(ids_h) == 10 and len(ids_r) == 40 and not ids_h & ids_r
    assert forgetting.split_lima(rows, n_heldout=10) == (held, replay)
    with pytest.raises(ValueError, match="none for replay"):
        forgetting.split_lima(rows, n_heldout=50)


def test_arm_labels_with_seeds():
    labels = forgetting.arm_labels(["base", "domain", "tg_balance"], [0, 1])
    assert labels == ["base", "domain", "tg_balance", "domain@s1", "tg_balance@s1"]
    assert forgetting.parse_label("tg_balance@s1") == ("tg_balance", 1)
    assert forgetting.parse_label("domain") == ("domain", 0)
    assert forgetting.run_name("domain_lora@s2") == "domain_lora-s2"
    assert forgetting.arm_label("base", 3) == "base"
    assert forgetting.seed_overrides(0) == [] and forgetting.seed_overrides(1) == ["train.seed=1", "mix.seed=1"]


def test_equal_steps_overrides():
    manifest = {"steps": 90, "train": {"epochs": 2}, "mix": {"tg_share_tokens": 0.3333}}
    assert forgetting.equal_steps_overrides(manifest) == ["train.max_steps=90", "train.epochs=4"]
    with pytest.raises(ValueError, match="step count"):
        forgetting.equal_steps_overrides({"train": {"epochs": 2}})


def test_arm_configs_for_lora_equal_steps_and_seeds(tmp_path):
    args = Namespace(work_dir=tmp_path, eval_data_dir=tmp_path / "eval", tasks=TASKS, limit=5, set=[],
                     config=forgetting.CONFIG, lora_lr=None, lima_heldout=100, tag="dev")
    files = (tmp_path / "train.json", tmp_path / "heldout.json")
    base_lr = forgetting.arm_config(args, "domain", train_file=files[0], heldout_file=files[1]).train.lr

    lora = forgetting.arm_config(args, "domain_lora", train_file=files[0], heldout_file=files[1]).train
    assert (lora.lora.r, lora.lora.alpha, lora.lora.dropout, lora.lr) == (16, 32, 0.05, base_lr)
    args.lora_lr = 2e-3
    assert forgetting.arm_config(args, "domain_lora", train_file=files[0], heldout_file=files[1]).train.lr == 2e-3

    seeded = forgetting.arm_config(args, "replay_lima@s1", train_file=files[0], heldout_file=files[1])
    assert (seeded.name, seeded.train.seed, seeded.mix.seed) == ("replay_lima-s1", 1, 1)
    assert seeded.mix.tg_corpus == str(tmp_path / "corpus_replay_lima_h100")

    with pytest.raises(FileNotFoundError, match="tg_balance"):
        forgetting.arm_config(args, "domain_equal_steps", train_file=files[0], heldout_file=files[1])
    # a kept scoring (the model is gone) carries the train manifest's numbers under "train" ...
    folder = tmp_path / "arms" / "tg_balance"
    (folder / "train").mkdir(parents=True)
    kept = {"train": {"steps": 9, "train": {"epochs": 4}, "mix": {"tg_share_tokens": 0.3}}}
    (folder / "result-dev.json").write_text(json.dumps(kept))
    eq = forgetting.arm_config(args, "domain_equal_steps", train_file=files[0], heldout_file=files[1])
    assert (eq.train.max_steps, eq.train.epochs, eq.mix.tg_ratio) == (9, 7, 0)
    # ... and the manifest itself wins when the model is there
    (folder / "train" / "manifest.json").write_text(
        json.dumps({"steps": 7, "train": {"epochs": 2}, "mix": {"tg_share_tokens": 0.5}}))
    eq = forgetting.arm_config(args, "domain_equal_steps", train_file=files[0], heldout_file=files[1])
    assert (eq.train.max_steps, eq.train.epochs, eq.mix.tg_ratio) == (7, 5, 0)


def test_kl_is_added_only_to_a_trained_arm_with_prompts_and_a_model(tmp_path):
    args = Namespace(work_dir=tmp_path, eval_data_dir=tmp_path / "eval", tasks=TASKS, limit=5, set=[],
                     config=forgetting.CONFIG, lora_lr=None, lima_heldout=100, tag="dev")
    files = (tmp_path / "train.json", tmp_path / "heldout.json")
    model = tmp_path / "model"
    # forgetting.yaml asks for no KL prompts; study.yaml asks for 32, but base, a kept KL or a missing model add none
    assert forgetting.add_kl(args, "domain", model, {}, files) is False
    args.config = forgetting.CONFIG.parent / "study.yaml"
    assert forgetting.add_kl(args, "base", model, {}, files) is False
    assert forgetting.add_kl(args, "domain", model, {"kl": {"value": 0.1}}, files) is False
    assert forgetting.add_kl(args, "domain", model, {}, files) is False  # no config.json in model/
    assert not list(tmp_path.rglob("result-*.json"))


def test_only_retention_probes_scored_on_other_dialogues_are_stale():
    def dialogues(ids, text="hi"):
        return [{"dialogue_id": i, "messages": [{"role": "user", "content": text}]} for i in ids]

    probes = {"retention": dialogues(["a", "b"]), "retention_wide": dialogues(["c"])}
    kept = {"retention": {"items": {"ids": ["b", "a"], "nll": [1.0, 2.0]}}}  # scored before digests were kept
    assert forgetting.stale_probes(kept, probes) == ["retention_wide"]  # same ids: fresh; never scored: stale
    kept["retention"]["items"]["ids"] = ["a", "x"]  # the corpus was made anew
    assert forgetting.stale_probes(kept, probes) == ["retention", "retention_wide"]
    # With a digest, the texts count too: a corpus made anew can reuse node ids with other texts.
    kept = {key: {"items": {"ids": [d["dialogue_id"] for d in rows]}, "dialogues_sha256": forgetting.probe_digest(rows)}
            for key, rows in probes.items()}
    assert forgetting.stale_probes(kept, probes) == []
    probes["retention"] = dialogues(["a", "b"], text="hello")
    assert forgetting.stale_probes(kept, probes) == ["retention"]
    assert forgetting.stale_probes(kept, {}) == []  # no corpus, no probe to score


def _result(acc: dict[str, list[float]], nll: float) -> dict:
    tasks = {t: {"n": len(v), "metrics": {"acc": {"value": sum(v) / len(v), "stderr": 0.1}},
                 "items": {"ids": list(range(len(v))), "acc": v, "acc_norm": v}} for t, v in acc.items()}
    return {"tasks": tasks, "domain_nll": {"metrics": {"nll": {"value": nll, "stderr": 0.01}}},
            "lima_heldout_nll": {"metrics": {"nll": {"value": nll + 1, "stderr": 0.01}}}}


def test_paired_summary_and_seed_spread():
    ones, zeros = [1.0] * 4, [0.0] * 4
    results = {"base": _result({TASKS[0]: ones, TASKS[1]: ones}, 1.0),
               "domain": _result({TASKS[0]: zeros, TASKS[1]: ones}, 0.5),
               "tg_balance": _result({TASKS[0]: ones, TASKS[1]: [1.0, 1.0, 0.0, 0.0]}, 0.6),
               "tg_balance@s1": _result({TASKS[0]: ones, TASKS[1]: ones}, 0.7)}
    arms = forgetting.summarize(results, tasks=TASKS)
    assert arms["domain"]["tasks"][TASKS[0]]["value"] == 0.0  # the existing keys stay
    vs_base = arms["domain"]["paired_vs_base"]
    assert vs_base["reference"] == "base"
    assert vs_base["tasks"][TASKS[0]]["acc"]["delta"] == -1.0 and vs_base["tasks"][TASKS[1]]["acc"]["delta"] == 0.0
    assert vs_base["mean"]["acc"]["delta"] == pytest.approx(-0.5)
    assert vs_base["mean"]["acc"]["ci95"] == pytest.approx([-0.5, -0.5])  # every item moves identically per task
    assert vs_base["mean"]["acc"]["tasks"] == TASKS
    del results["tg_balance"]["tasks"][TASKS[1]]["items"]["acc_norm"]  # a task without acc_norm (winogrande)
    assert forgetting.paired_vs(results, "tg_balance", "base", tasks=TASKS)["mean"]["acc_norm"]["tasks"] == TASKS[:1]
    vs_domain = arms["tg_balance"]["paired_vs_domain"]
    assert vs_domain["mean"]["acc_norm"]["delta"] == pytest.approx(0.25)
    lo, hi = vs_domain["mean"]["acc"]["ci95"]
    assert 0.0 <= lo <= 0.25 <= hi <= 0.5
    assert arms["tg_balance@s1"]["paired_vs_domain"]["reference"] == "domain"  # no domain@s1: seed 0's domain
    assert "paired_vs_base" not in arms["base"] and "paired_vs_domain" not in arms["domain"]
    spread = forgetting.seed_spread(arms)
    assert list(spread) == ["tg_balance"] and spread["tg_balance"]["seeds"] == [0, 1]
    assert spread["tg_balance"]["domain_nll"] == pytest.approx({"min": 0.6, "max": 0.7, "mean": 0.65})
    assert spread["tg_balance"]["mean_acc"]["min"] == pytest.approx(0.75)
    lines = forgetting._study_lines(arms, list(arms), spread)
    assert any(line.startswith("| tg_balance | [0, 1] |") for line in lines)


def test_primary_endpoint_takes_each_tasks_preregistered_metric():
    """ARC-Easy's primary metric is acc_norm, WinoGrande's acc: the endpoint mixes them, item by item."""
    arc, wino = "tgsft_arc_easy", "tgsft_winogrande"
    base = {"tasks": {t: {"items": {"ids": [0, 1, 2, 3], "acc": [1.0] * 4, "acc_norm": [1.0] * 4}}
                      for t in (arc, wino)}}
    arm = {"tasks": {arc: {"items": {"ids": [0, 1, 2, 3], "acc": [1.0] * 4, "acc_norm": [0.0] * 4}},
                     wino: {"items": {"ids": [0, 1, 2, 3], "acc": [1.0, 1.0, 0.0, 0.0], "acc_norm": [0.0] * 4}}}}
    out = forgetting.paired_vs({"base": base, "arm": arm}, "arm", "base", tasks=[arc, wino])
    primary = out["primary"]
    assert primary["metrics"] == {arc: "acc_norm", wino: "acc"}
    assert primary["delta"] == pytest.approx((-1.0 - 0.5) / 2) and primary["n"] == 8
    lo, hi = primary["ci95"]
    assert -1.0 <= lo <= primary["delta"] <= hi <= -0.5
    assert out["mean"]["acc"]["delta"] == pytest.approx(-0.25)  # the per-metric means stay
    assert "primary" not in forgetting.paired_vs({"base": base, "arm": {"tasks": {}}}, "arm", "base", tasks=[arc])


def test_domain_split_leaves_out_empty_outputs_and_keeps_every_other_rows_place(tmp_path):
    rows = [{"instruction": f"i{k}", "input": "", "output": "" if k in (3, 7) else f"o{k}"} for k in range(12)]
    src = tmp_path / "shared" / "sft" / "code_alpaca"
    src.mkdir(parents=True)
    (src / "code_alpaca_2k.json").write_text(json.dumps(rows))
    train, heldout = forgetting.prepare_domain(tmp_path / "shared", tmp_path / "w", n_train=6, n_heldout=4)
    kept = [r for r in rows if r["output"]]
    import random

    order = rows[:]
    random.Random(0).shuffle(order)
    expected = [r for r in order if r["output"]]
    assert json.loads(heldout.read_text()) + json.loads(train.read_text()) == expected[:10]
    assert len(kept) == 10
    with pytest.raises(ValueError, match="do not fit"):
        forgetting.prepare_domain(tmp_path / "shared", tmp_path / "w", n_train=7, n_heldout=4)
