"""The end-to-end run, submitted with `ray job submit` to a local head started on free loopback ports.

This is the suite's one full pipeline run (generate -> mix -> train -> serve -> eval -> report) on the embedded
default, reduced in size; `make run` does the full-size one.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.serve import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head():
    """`ray start --head --block` on free loopback ports with token auth, in its own process group.

    Stopped by killing that group only: `ray stop` would kill every Ray process on the machine, including the
    session's own cluster.
    """
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    # Free ports for the agents too: the session's own Ray may hold their defaults.
    agents = [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
              f"--runtime-env-agent-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}"]
    proc = subprocess.Popen(
        [BIN / "ray", "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=8", "--disable-usage-stats",
         *agents],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, "ray start --head exited"
            status = subprocess.run([BIN / "ray", "job", "list", "--address", address], env=env,
                                    capture_output=True, timeout=120)
            if status.returncode == 0:
                break
            assert time.monotonic() < deadline, status.stderr.decode()[-2000:]
            time.sleep(2)
        yield env, address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        _forget_head(gcs)


def _forget_head(gcs_port: int) -> None:
    """Remove the address file `ray start` wrote for this head, as `ray stop` does: after the test, a plain
    `ray.init()` on this machine must start its own Ray, not try to join the stopped head. (While the head runs, the
    file is what lets the cluster's own processes, such as Ray Train's placement-group cleaner, find it.)"""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    if path.is_file() and path.read_text().strip().endswith(f":{gcs_port}"):
        path.unlink()


def test_ray_job_submit_runs_the_pipeline(head, tmp_path):
    env, address = head
    out = tmp_path / "runs"
    overrides = [
        f"output_root={out}", "name=job",
        "tree.branching=[6,1,1,1]", "tree.max_new_tokens=[32,96,32,96]",  # questions cut at the limit are dropped
        # Small steps, many of them: ~17 optimizer steps of 2 rows of <= 160 tokens (the domain's format is
        # learned within a few steps; the MLflow check below wants >= 10 logged steps).
        "data.max_examples=32", "train.max_seq_len=160", "train.epochs=1", "train.micro_batch_size=2",
        "eval.limit=10", "eval.domain.limit=6", "eval.retention_dialogues=2", "eval.kl_prompts=6",
        f"serve.port={free_port()}",
        "eval.noise_floor_concurrent=0",  # the A/A pass is covered by test_serve_eval.py
    ]
    cmd = [BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
           "tgsft", "run", "configs/local.yaml"] + [a for o in overrides for a in ("-o", o)]
    t0 = time.monotonic()
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=2700)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in logs.lower(), logs[-4000:]
    print(f"job finished in {time.monotonic() - t0:.0f} s")

    run_dir = out / "job"
    corpus = json.loads((run_dir / "corpus" / "manifest.json").read_text())
    assert corpus["status"] == "complete" and corpus["dialogues"] >= 1
    assert {"distinct_2", "self_bleu", "mean_pairwise_cosine", "cluster_entropy"} <= set(corpus["quality"])
    assert (run_dir / "corpus" / "README.md").read_text().startswith("---\n")  # the dataset card's YAML header
    assert (run_dir / "train" / "model" / "config.json").is_file()
    assert list((run_dir / "train" / "model").glob("*.safetensors"))
    evals = {m: json.loads((run_dir / "eval" / f"{m}.json").read_text()) for m in ("base", "tuned")}
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert (run_dir / "report" / "report.png").stat().st_size > 0
    md = (run_dir / "report" / "report.md").read_text()
    assert "tgsft_general" in md and "tgsft_general" in logs  # the report table is printed at the end
    # The report carries the eval numbers, and the tuned model learned the domain (base: 0 exact JSON).
    acc = {(r["task"], r["metric"]): r for r in report["rows"]}
    general = acc[("tgsft_general", "acc")]
    assert general["base"]["value"] == evals["base"]["tasks"]["tgsft_general"]["metrics"]["acc"]["value"]
    assert general["variants"]["tuned"]["value"] == evals["tuned"]["tasks"]["tgsft_general"]["metrics"]["acc"]["value"]
    assert 0 <= general["base"]["value"] <= 1 and general["base"]["stderr"] > 0
    domain_base = evals["base"]["domain"]["metrics"]["field_acc"]["value"]
    domain_tuned = evals["tuned"]["domain"]["metrics"]["field_acc"]["value"]
    assert domain_tuned > domain_base, (domain_base, domain_tuned)
    assert evals["tuned"]["retention"]["n_dialogues"] == 2
    # The console showed the pipeline's own progress; what the workers printed went to the run's log file.
    assert "train: step 1/" in logs and "eval: tuned ->" in logs and "(RayTrainWorker" not in logs
    assert "(RayTrainWorker" in (run_dir / "logs" / "tgsft.log").read_text(errors="replace")
    # The run's MLflow store: the config as params, every training step, every model's eval metrics, the report.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("job").experiment_id])
    assert tracked.info.status == "FINISHED"
    assert tracked.data.params["name"] == "job" and tracked.data.params["tree.branching"] == "[6, 1, 1, 1]"
    trained = json.loads((run_dir / "train" / "manifest.json").read_text())
    losses = sorted((m.step, m.value) for m in client.get_metric_history(tracked.info.run_id, "train/loss"))
    assert len(losses) >= 10 and [s for s, _ in losses] == list(range(1, trained["steps"] + 1))
    assert [v for _, v in losses] == pytest.approx(trained["losses"], abs=1e-4)
    assert len(client.get_metric_history(tracked.info.run_id, "train/tokens_per_s")) == len(losses)
    for m in ("base", "tuned"):
        metrics = tracked.data.metrics
        assert metrics[f"eval/{m}/tgsft_general/acc"] == evals[m]["tasks"]["tgsft_general"]["metrics"]["acc"]["value"]
        assert metrics[f"eval/{m}/domain/field_acc"] == evals[m]["domain"]["metrics"]["field_acc"]["value"]
    assert {a.path for a in client.list_artifacts(tracked.info.run_id, "report")} == {
        "report/report.md", "report/report.json", "report/report.png"}
    # The job ran with the cluster's auth token in its environment: no file of the run may carry it.
    token = env["RAY_AUTH_TOKEN"].encode()
    leaked = [str(p) for p in run_dir.rglob("*") if p.is_file() and token in p.read_bytes()]
    assert not leaked, leaked
