"""Serve the embedded model with Ray Serve LLM and evaluate it end to end: tgsft_general, an offline mirror on an
upstream-format fixture, the built-in domain task and the retention probe on a hand-made corpus; bad requests get
clear errors, and a killed replica is replaced (one served app for the whole module; start-up takes about a
minute)."""

from __future__ import annotations

import json
import math
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config import TGConfig
from pipeline.corpus import DIALOGUE_SCHEMA, write_table
from pipeline.serve import request_json

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "eval"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _corpus(directory: Path) -> Path:
    """Six small TG-style dialogues (two turns each) in the corpus layout."""
    topics = ["volcanoes", "bread", "the moon", "bicycles", "rain", "libraries"]
    rows = []
    for i, topic in enumerate(topics):
        messages = [
            {"role": "user", "content": f"Can you tell me something about {topic}?"},
            {"role": "assistant", "content": f"Sure. {topic.capitalize()} are a common topic; here is a short fact."},
            {"role": "user", "content": "Why does that matter?"},
            {"role": "assistant", "content": "It helps people understand the world around them."},
        ]
        rows.append({"dialogue_id": f"n{i:03d}", "messages": messages, "text": None, "node_ids": [f"n{i:03d}"],
                     "n_turns": 2, "n_tokens": 40, "tree": "test"})
    write_table(pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA), directory / "dialogues", shard_rows=100)
    return directory


@pytest.fixture(scope="module")
def served(ray_session, model_path, tmp_path_factory):
    from pipeline.serve import serving

    cfg = TGConfig(output_root=str(tmp_path_factory.mktemp("runs")), name="it")
    cfg.serve.port = _free_port()
    cfg.serve.kv_cache_gib = 1.0
    with serving(cfg, {"base": model_path}) as base_url:
        yield cfg, base_url


def test_endpoint_lists_model_and_returns_prompt_logprobs(served):
    from pipeline.evaluate import check_prompt_logprobs

    cfg, base_url = served
    assert base_url == f"http://127.0.0.1:{cfg.serve.port}"
    assert [m["id"] for m in request_json(f"{base_url}/v1/models")["data"]] == ["base"]
    check_prompt_logprobs(base_url, "base")


def test_evaluate_and_report(served, model_path, tmp_path):
    from pipeline.evaluate import evaluate
    from pipeline.report import write_report

    cfg, base_url = served
    cfg.eval.tasks = ["tgsft_general", "tgsft_arc_easy"]
    cfg.eval.data_dir = str(FIXTURES)
    cfg.eval.domain.limit = 6
    cfg.eval.domain.max_new_tokens = 40
    cfg.eval.retention_dialogues = 4
    out_dir = Path(cfg.run_dir) / "eval"

    results = evaluate(cfg, models={"base": model_path}, base_url=base_url, out_dir=out_dir,
                       corpus_dir=_corpus(tmp_path / "corpus"))
    stored = json.loads((out_dir / "base.json").read_text())
    assert stored == results["base"]

    general = stored["tasks"]["tgsft_general"]
    assert general["n"] >= 20
    for name in ("acc", "acc_norm"):
        m = general["metrics"][name]
        assert 0.0 <= m["value"] <= 1.0 and m["stderr"] is not None and m["stderr"] > 0
    # a 135M instruct model knows some of these (chance is 0.25)
    assert general["metrics"]["acc"]["value"] >= 0.3
    arc = stored["tasks"]["tgsft_arc_easy"]
    assert arc["n"] == 3 and 0.0 <= arc["metrics"]["acc"]["value"] <= 1.0 and arc["metrics"]["acc"]["stderr"] >= 0

    domain = stored["domain"]
    assert domain["n"] == 6 and domain["primary"] == "json_exact"
    assert domain["source"].endswith("domain/eval.jsonl")
    for name in ("json_exact", "field_acc", "exact_match", "token_f1"):
        m = domain["metrics"][name]
        assert 0.0 <= m["value"] <= 1.0 and m["stderr"] is not None
    assert all(isinstance(e["prediction"], str) and e["prediction"] for e in domain["examples"])

    probe = stored["retention"]
    assert probe["n_dialogues"] == 4 and probe["n_tokens"] > 4 * 10
    nll, ppl = probe["metrics"]["nll"], probe["metrics"]["ppl"]
    assert 0.0 < nll["value"] < 10.0 and nll["stderr"] is not None
    assert ppl["value"] == pytest.approx(math.exp(nll["value"]))

    report = write_report(Path(cfg.run_dir))
    row = next(r for r in report["rows"] if r["task"] == "tgsft_general" and r["metric"] == "acc")
    assert row["base"]["value"] == general["metrics"]["acc"]["value"]
    assert (Path(cfg.run_dir) / "report" / "report.png").is_file()


def _post(url: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_bad_requests_get_clear_errors(served):
    """The endpoint's side of the bad-input catalogue: malformed body, unknown model id, max_tokens too large."""
    cfg, base_url = served
    url = f"{base_url}/v1/completions"
    code, body = _post(url, b'{"model": "base", "prompt": ')
    assert code in (400, 422) and "json" in body.lower(), (code, body)
    code, body = _post(url, json.dumps({"model": "nope", "prompt": "Hi", "max_tokens": 4}).encode())
    assert code == 404 and 'Could not find base model with ID "nope"' in json.loads(body)["detail"], (code, body)
    too_many = cfg.model.max_model_len + 1
    code, body = _post(url, json.dumps({"model": "base", "prompt": "Hi", "max_tokens": too_many}).encode())
    assert code == 400, (code, body)
    assert f"max_tokens={too_many} cannot be greater than max_model_len={cfg.model.max_model_len}" in body, body
    # the endpoint still answers after the bad requests
    assert request_json(url, payload={"model": "base", "prompt": "Hi", "max_tokens": 2})["choices"][0]["text"]


def _replica_pids() -> list[int]:
    import psutil

    # process titles: ray::ServeReplica:tgsft:LLMServer:base.<method>, ray::SERVE_REPLICA::...:ServeReplica:tgsft:...
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if " ".join(p.info["cmdline"] or []).startswith("ray::")
            and "ServeReplica:tgsft:LLMServer:base" in " ".join(p.info["cmdline"] or [])]


def test_killed_replica_is_replaced(served):
    """SIGKILL the model's Serve replica: Serve starts a new one and requests succeed again (runs last: the
    module's endpoint is down for the restart)."""
    import os
    import time

    cfg, base_url = served
    before = _replica_pids()
    assert len(before) == 1, before
    os.kill(before[0], 9)
    deadline, last = time.monotonic() + cfg.serve.ready_timeout_s, ""
    payload = {"model": "base", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    while time.monotonic() < deadline:
        try:
            text = request_json(f"{base_url}/v1/completions", payload=payload, timeout=60)["choices"][0]["text"]
            if _replica_pids() and _replica_pids() != before:
                break
        except Exception as e:  # noqa: BLE001 - any failure while the replica restarts
            last = repr(e)
        time.sleep(2)
    else:
        pytest.fail(f"no answer from a new replica within {cfg.serve.ready_timeout_s} s ({last})")
    assert text.strip() and _replica_pids() != before
