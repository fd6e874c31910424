"""Smoke version of the forgetting benchmark (benchmarks/forgetting.py): two arms (base, domain-only) on the tiny
fixtures in tests/fixtures/forgetting/ (no ../shared/data needed), a few real DeepSpeed steps, a real Ray Serve
endpoint and lm-eval on 5 ARC-Easy items. No TG corpus is generated (``--presets`` with none), so the retention
probe is skipped; the domain NLL probe still runs. Both arms are served by one Serve app; that start-up and one Ray
Train run dominate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "forgetting"


def test_forgetting_smoke(tmp_path, ray_session):
    cmd = [
        sys.executable, str(REPO / "benchmarks" / "forgetting.py"),
        "--shared-data", str(FIXTURES), "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "res"),
        "--name", "smoke", "--arms", "base", "domain", "--presets", "--tasks", "tgsft_arc_easy", "--limit", "5",
        "--domain-train", "20", "--domain-heldout", "6",
        "--set", "train.epochs=3", "--set", "train.max_steps=3", "--set", "train.log_every=1",
        # one worker: the study's 2-worker ZeRO-2 is test_train.py's; here the script's orchestration is under test
        "--set", "train.num_workers=1", "--set", "train.cpus_per_worker=2", "--set", "train.zero_stage=0",
        "--set", "eval.domain.limit=3", "--set", "eval.domain.max_new_tokens=16",
        "--set", "eval.noise_floor_concurrent=0",  # the A/A pass is covered by test_serve_eval.py
    ]
    # The script joins the session's cluster: a second local Ray on one machine can clash on fixed agent ports.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(*[line for line in proc.stdout.splitlines() if line.startswith("[")], sep="\n")  # its timed progress

    summary = json.loads((tmp_path / "res" / "smoke.json").read_text())
    assert summary["status"] == "complete"
    base, tuned = summary["arms"]["base"], summary["arms"]["domain"]
    for arm in (base, tuned):
        acc = arm["tasks"]["tgsft_arc_easy"]
        assert acc["n"] == 5 and 0.0 <= acc["value"] <= 1.0 and acc["stderr"] is not None
        assert 0.0 < arm["domain_nll"]["value"] < 10.0
        assert "retention_nll_balance" not in arm  # no corpus was generated
    assert tuned["train"]["steps"] == 3 and tuned["train"]["extra_examples"] == 0
    assert tuned["train"]["domain_examples"] == 20
    # The base model is scored deterministically on the 6 held-out fixture examples (1.074 when this was written);
    # three un-warmed steps at lr 1e-3 move the tuned model far from it (4.50 then: the first Adam steps at this lr
    # disrupt the model before they teach it anything, as in the full experiment).
    assert base["domain_nll"]["value"] == pytest.approx(1.074, abs=0.1)
    assert abs(tuned["domain_nll"]["value"] - base["domain_nll"]["value"]) > 0.1
    assert (tmp_path / "res" / "smoke.md").is_file() and (tmp_path / "res" / "smoke.png").stat().st_size > 0
