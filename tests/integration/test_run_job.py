"""The end-to-end run on a two-node Ray cluster on this machine, submitted with `ray job submit`.

A head and a worker node are started with `ray start` on free loopback ports with token auth, each with its own
Ray temp dir (as on two machines) and custom resource: the job's driver asks for `tgsft_head`, and the run pins its
engine actors, training workers and served replicas to the worker node by asking for `tgsft_worker`
(engine.resources, train.resources_per_worker, serve.resources).
This is the suite's one full pipeline run (generate -> mix -> train -> serve -> eval -> report) on the embedded
default, reduced in size; `make run` does the full-size one.

The worker node runs in its own mount namespace with a private tmpfs over one folder (`hidden`): a folder the driver
writes and the worker node cannot see, as on a cluster without shared storage there.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline import tree
from pipeline.corpus import read_nodes
from pipeline.serve import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BRANCHING = [6, 1, 1, 1]
PINNED = "{tgsft_worker: 1}"


def _agent_ports() -> list[str]:
    """Free ports for a node's agents: the session's own Ray and the other node may hold their defaults."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}"]


def _start(args: list, env: dict, log: Path) -> subprocess.Popen:
    """A `ray start ... --block` in its own process group, its output in ``log``."""
    with log.open("w") as out:
        return subprocess.Popen([str(a) for a in args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a node: SIGTERM to its `ray start`, which stops the processes it started, then SIGKILL to whatever of
    its process group is left. (`ray stop` would kill every Ray process on the machine, including the session's own
    cluster.)"""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone already
        pass


def _state(env: dict, address: str, what: str) -> list[dict]:
    """`ray list <what>` through the State API, as JSON (dead actors included)."""
    cmd = [BIN / "ray", "list", what, "--address", address, "--format", "json", "--detail", "--limit", "10000"]
    out = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (`tgsft_head`) and a worker node (`tgsft_worker`, in a mount namespace that hides ``hidden``).

    Yields:
        ``(env, dashboard address, the worker node's State API record, hidden folder)``.
    """
    if os.geteuid() != 0:
        pytest.skip("the worker node's private mount namespace needs root (unshare --mount)")
    hidden = tmp_path_factory.mktemp("hidden")
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # a node stops at once (draining waits up to 30 s for nothing)
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    address = f"http://127.0.0.1:{dash}"
    logs = tmp_path_factory.mktemp("nodes")
    # The worker node's own Ray temp dir, as on a separate machine: with the head's, its runtime-env agent would
    # unpack the job's working_dir anew over the very folder the driver runs in. Short: Unix socket paths under it.
    worker_tmp = tempfile.mkdtemp(prefix="tgw", dir="/tmp")
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--object-store-memory=2000000000"]
    procs = {"head": _start([BIN / "ray", "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--num-cpus=4", '--resources={"tgsft_head": 1}', *common,
                             *_agent_ports()], env, logs / "head.log")}
    try:
        _wait_alive(env, address, procs, logs, 1)
        procs["worker"] = _start(["unshare", "--mount", "sh", "-c", 'mount -t tmpfs tgsft-hidden "$0" && exec "$@"',
                                  hidden, BIN / "ray", "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=6",
                                  '--resources={"tgsft_worker": 8}', f"--temp-dir={worker_tmp}", *common,
                                  *_agent_ports()], env, logs / "worker.log")
        alive = _wait_alive(env, address, procs, logs, 2)
        (worker,) = [n for n in alive if "tgsft_worker" in n["resources_total"]]
        yield env, address, worker, hidden
    finally:
        for proc in reversed(procs.values()):
            _stop(proc)
        _forget_head(gcs)
        shutil.rmtree(worker_tmp, ignore_errors=True)


def _wait_alive(env: dict, address: str, procs: dict[str, subprocess.Popen], logs: Path, n: int) -> list[dict]:
    """The State API's records of the cluster's alive nodes, once there are ``n`` (at most 300 s)."""
    deadline = time.monotonic() + 300
    while True:
        for name, proc in procs.items():
            if proc.poll() is not None:
                pytest.fail(f"`ray start` of the {name} exited: {(logs / f'{name}.log').read_text()[-3000:]}")
        try:
            alive = [node for node in _state(env, address, "nodes") if node["state"] == "ALIVE"]
        except (subprocess.CalledProcessError, json.JSONDecodeError):
            alive = []
        if len(alive) == n:
            return alive
        assert time.monotonic() < deadline, f"{len(alive)} node(s) alive after 300 s, not {n}"
        time.sleep(2)


def _forget_head(gcs_port: int) -> None:
    """Remove the address file `ray start` wrote for this head, as `ray stop` does: after the test, a plain
    `ray.init()` on this machine must start its own Ray, not try to join the stopped head. (While the head runs, the
    file is what lets the cluster's own processes, such as Ray Train's placement-group cleaner, find it.)"""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    if path.is_file() and path.read_text().strip().endswith(f":{gcs_port}"):
        path.unlink()


def _submit(env: dict, address: str, overrides: list[str], timeout: float) -> tuple[int, str]:
    """`ray job submit ... -- tgsft run configs/local.yaml -o ...` with its driver on the head node: (exit code,
    the job's output)."""
    cmd = [BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--entrypoint-resources", '{"tgsft_head": 1}', "--",
           "tgsft", "run", "configs/local.yaml"] + [a for o in overrides for a in ("-o", o)]
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_storage_a_node_cannot_see_stops_the_run_at_start(cluster):
    """output_root and train.storage_path in the folder the worker node cannot see: the run stops before any stage,
    naming the node, each folder and its config field, and leaves no probe file behind."""
    env, address, worker, hidden = cluster
    t0 = time.monotonic()
    code, logs = _submit(env, address, [f"output_root={hidden / 'runs'}", "name=unshared",
                                        f"train.storage_path={hidden / 'ckpt'}"], timeout=600)
    assert code != 0, logs[-4000:]
    where = f"node {worker['node_ip']} (id {worker['node_id']})"
    assert f"{where} cannot see {hidden / 'runs' / 'unshared'} (output_root)" in logs, logs[-4000:]
    assert f"{where} cannot see {hidden / 'ckpt'} (train.storage_path)" in logs
    assert "Every node of the cluster must see output_root and train.storage_path" in logs
    assert "== generate" not in logs and time.monotonic() - t0 < 300
    assert not list(hidden.rglob(".tgsft-storage-probe-*"))


def test_ray_job_submit_runs_the_pipeline_on_two_nodes(cluster, tmp_path):
    env, address, worker, _ = cluster
    out = tmp_path / "runs"
    overrides = [
        f"output_root={out}", "name=job",
        f"tree.branching={BRANCHING}", "tree.max_new_tokens=[32,96,32,96]",  # questions cut at the limit are dropped
        # Small steps, many of them: ~17 optimizer steps of 2 rows of <= 160 tokens (the domain's format is
        # learned within a few steps; the MLflow check below wants >= 10 logged steps).
        "data.max_examples=32", "train.max_seq_len=160", "train.epochs=1", "train.micro_batch_size=2",
        "train.checkpoint_every=0",  # a checkpoint only at the end: resuming is covered by test_train.py
        "eval.limit=10", "eval.domain.limit=6", "eval.retention_dialogues=2", "eval.kl_prompts=6",
        f"serve.port={free_port()}",
        "eval.noise_floor_concurrent=0",  # the A/A pass is covered by test_serve_eval.py
        f"engine.resources={PINNED}", f"train.resources_per_worker={PINNED}", f"serve.resources={PINNED}",
    ]
    t0 = time.monotonic()
    code, logs = _submit(env, address, overrides, timeout=1100)  # under the suite's per-test 1200 s
    assert code == 0 and "succeeded" in logs.lower(), logs[-4000:]
    stages = [line for line in logs.splitlines() if "run job finished in" in line]  # the run's time per stage
    print(f"job finished in {time.monotonic() - t0:.0f} s;", *stages)
    print(*[line for line in logs.splitlines() if "eval: " in line], sep="\n")  # the eval stage's split
    assert f"storage: all 2 nodes see output_root {out / 'job'}" in logs

    # The pinned pieces ran on the worker node, and only there.
    actors = _state(env, address, "actors")
    placed = {kind: {a["node_id"] for a in actors if a["class_name"].startswith(prefix)}
              for kind, prefix in (("engines", "GenerationEngine"), ("training workers", "RayTrainWorker"),
                                   ("served replicas", "ServeReplica:tgsft:LLMServer"))}
    assert placed == {kind: {worker["node_id"]} for kind in placed}, placed

    # Node ids are derived from (seed, parent, branch) alone: every level is exactly the expansion of the kept nodes
    # above it, and level 1 (all of it, kept or dropped, depends on nothing but seed and N_1) is the one a
    # single-node run with the same seed has. No single-node run of this tree shape is in the session, so that
    # reference is computed with tree.expand, which is what generation expands every level with.
    nodes = read_nodes(out / "job" / "corpus").to_pylist()
    levels = [[n for n in nodes if n["level"] == level] for level in range(1, len(BRANCHING) + 1)]
    assert tree.check_levels(levels, branching=BRANCHING, run_seed=0) == []
    single_node = tree.expand([{"node_id": tree.ROOT_ID, "group": None}], level=1, branching=BRANCHING[0], run_seed=0)
    assert {r["node_id"] for r in levels[0]} == {c["node_id"] for c in single_node}

    run_dir = out / "job"
    corpus = json.loads((run_dir / "corpus" / "manifest.json").read_text())
    assert corpus["status"] == "complete" and corpus["dialogues"] >= 1
    assert {"distinct_2", "self_bleu", "mean_pairwise_cosine", "cluster_entropy"} <= set(corpus["quality"])
    assert (run_dir / "corpus" / "README.md").read_text().startswith("---\n")  # the dataset card's YAML header
    assert (run_dir / "train" / "model" / "config.json").is_file()
    assert list((run_dir / "train" / "model").glob("*.safetensors"))
    evals = {m: json.loads((run_dir / "eval" / f"{m}.json").read_text()) for m in ("base", "tuned", "domain_only")}
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
    # The domain-only control (configs/local.yaml's run.control): the same domain rows without TG, one pass over
    # them per epoch as in the TG arm, so fewer steps; served, scored and compared beside tuned.
    control = json.loads((run_dir / "train_domain_only" / "manifest.json").read_text())
    trained = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert control["mix"]["tg_examples"] == 0 and control["mix"]["domain_examples"] == trained["mix"]["domain_examples"]
    assert 0 < control["steps"] < trained["steps"]
    assert report["variants"] == ["domain_only", "tuned"]
    assert general["variants"]["domain_only"]["value"] == (
        evals["domain_only"]["tasks"]["tgsft_general"]["metrics"]["acc"]["value"])
    assert report["prevented"]["variant"] == "tuned" and isinstance(report["prevented"]["control_forgot"], bool)
    # The console showed the pipeline's own progress; what the workers printed went to the run's log file.
    assert "train: step 1/" in logs and "eval: tuned ->" in logs and "(RayTrainWorker" not in logs
    assert "(RayTrainWorker" in (run_dir / "logs" / "tgsft.log").read_text(errors="replace")
    # The run's MLflow store: the config as params, every training step, every model's eval metrics, the report.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("job").experiment_id])
    assert tracked.info.status == "FINISHED"
    assert tracked.data.params["name"] == "job" and tracked.data.params["tree.branching"] == "[6, 1, 1, 1]"
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
