"""Faults during tree generation, for real: the driver is killed with SIGKILL mid-level, an engine actor dies
mid-level. Both runs must end with the same per-level counts as an uninterrupted run with the same seed."""

import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.generate import generate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OVERRIDES = ["tree.branching=[3,1,2,1]", "tree.max_new_tokens=[40,96,40,96]", "tree.seed=11",
             "engine.enforce_eager=true", "engine.kv_cache_gib=1"]


def _counts(manifest):
    return {k: (v["generated"], v["kept"], v["dropped"]) for k, v in manifest["levels"].items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, engines):
    out = tmp_path_factory.mktemp("ref") / "corpus"
    cfg = load_config(None, overrides=[f"output_root={out.parent}", *OVERRIDES])
    return generate(cfg, out_dir=out, engines=engines, log=lambda _: None), out


def test_sigkill_of_the_driver_in_level_2_resumes(reference, tmp_path, engines, ray_session):
    ref_manifest, ref_out = reference
    out = tmp_path / "corpus"
    cmd = [sys.executable, "-m", "pipeline.cli", "generate", "--out", str(out), "-o", f"output_root={tmp_path}"]
    cmd += [a for o in OVERRIDES for a in ("-o", o)]
    # The driver joins the session's cluster (as under `ray job submit`): killing it kills its engine actors too.
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    level1 = out / "nodes" / "level=01" / "_SUCCESS"
    deadline = time.monotonic() + 600
    while not level1.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "level 1 never completed"
        time.sleep(0.2)
    time.sleep(1.0)  # inside level 2 now
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "nodes" / "level=02" / "_SUCCESS").exists(), "killed too late to test a mid-level crash"
    assert not (out / "dialogues").exists()
    # Nothing that looks complete was left behind: only finished levels and hidden temporaries.
    assert sorted(p.name for p in (out / "nodes").iterdir() if not p.name.startswith(".")) == ["level=01"]

    lines = []
    cfg = load_config(None, overrides=[f"output_root={tmp_path}", *OVERRIDES])
    resumed = generate(cfg, out_dir=out, engines=engines, log=lines.append)
    assert any(line.startswith("level 1/4 question: reused") for line in lines)
    assert _counts(resumed) == _counts(ref_manifest)
    nodes = pd.read_parquet(out / "nodes", partitioning=None)
    ref_nodes = pd.read_parquet(ref_out / "nodes", partitioning=None)
    assert nodes.node_id.is_unique
    assert set(nodes.node_id) == set(ref_nodes.node_id)  # same tree: nothing lost, nothing duplicated


def test_engine_actor_killed_mid_level_is_restarted(reference, tmp_path, engines):
    import ray

    out = tmp_path / "corpus"
    lines: list[str] = []
    cfg = load_config(None, overrides=[f"output_root={tmp_path}", *OVERRIDES])
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(
        generate(cfg, out_dir=out, engines=engines, log=lines.append)))
    worker.start()
    deadline = time.monotonic() + 600
    while not any(line.startswith("level 1/4") for line in lines):
        assert worker.is_alive() and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    ray.kill(engines[0], no_restart=False)  # crash the engine while level 2 is in flight
    worker.join(timeout=900)
    assert not worker.is_alive() and result, "generation did not finish after the engine restarted"
    assert _counts(result) == _counts(reference[0])
