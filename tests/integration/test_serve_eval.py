"""Serve the embedded model with Ray Serve LLM and evaluate it end to end: tgsft_general, an offline mirror on an
upstream-format fixture, the built-in domain task, the retention probe on a hand-made corpus, lm-eval's per-sample
files, the A/A repeat of base and the local KL probe (0 for a model against itself); bad requests get
clear errors, and a killed replica is replaced (one served app for the whole module; start-up takes about a
minute)."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config import TGConfig
from pipeline.corpus import DIALOGUE_SCHEMA, write_table
from pipeline.serve import free_port, request_json

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "eval"


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
    cfg.serve.port = free_port()
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
    cfg.eval.limit = 40
    cfg.eval.noise_floor_concurrent = 2
    cfg.eval.kl_prompts = 4
    out_dir = Path(cfg.run_dir) / "eval"

    results = evaluate(cfg, models={"base": model_path}, base_url=base_url, out_dir=out_dir,
                       corpus_dir=_corpus(tmp_path / "corpus"))
    stored = json.loads((out_dir / "base.json").read_text())
    assert stored == results["base"]
    assert sorted(results) == ["base", "base_repeat"]  # the A/A repeat of base

    general = stored["tasks"]["tgsft_general"]
    assert general["n"] == 40
    for name in ("acc", "acc_norm"):
        m = general["metrics"][name]
        assert 0.0 <= m["value"] <= 1.0 and m["stderr"] is not None and m["stderr"] > 0
    # a 135M instruct model knows some of these (chance is 0.25)
    assert general["metrics"]["acc"]["value"] >= 0.3
    arc = stored["tasks"]["tgsft_arc_easy"]
    assert arc["n"] == 3 and 0.0 <= arc["metrics"]["acc"]["value"] <= 1.0 and arc["metrics"]["acc"]["stderr"] >= 0

    # per-item scores, the gold answer's log-probability, and lm-eval's own files for both scorings of base
    items = general["items"]
    assert items["ids"] == list(range(40))
    assert sum(items["acc"]) / 40 == pytest.approx(general["metrics"]["acc"]["value"])
    gold = items["gold_logprob_per_byte"]
    assert len(gold) == 40 and all(-20.0 < g < 0.0 for g in gold)
    assert general["metrics"]["gold_logprob_per_byte"]["value"] == pytest.approx(sum(gold) / 40)
    for result_id in ("base", "base_repeat"):
        native = json.loads((out_dir / result_id / "results.json").read_text())
        assert set(native["results"]) == {"tgsft_general", "tgsft_arc_easy"}
        samples = [json.loads(line) for line in (out_dir / result_id / "samples_tgsft_general.jsonl").open()]
        assert sorted(r["doc_id"] for r in samples) == list(range(40))
        first = min(samples, key=lambda r: r["doc_id"])
        assert first["acc"] == items["acc"][0] and len(first["filtered_resps"]) == 4
    assert (out_dir / "base" / "samples_tgsft_arc_easy.jsonl").is_file()
    repeat = results["base_repeat"]
    assert repeat["served_id"] == "base" and repeat["eval_config"]["num_concurrent"] == 2
    assert "domain" not in repeat and repeat["tasks"]["tgsft_general"]["items"]["ids"] == items["ids"]

    # KL of base against itself is exactly 0 (computed locally, deterministically)
    assert stored["kl"]["n"] == 4 and stored["kl"]["value"] == 0.0 and stored["kl"]["items"]["values"] == [0.0] * 4

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
    assert report["noise_floor"] == "base_repeat" and report["variants"] == []
    aa = next(c for c in report["comparisons"] if c["task"] == "tgsft_general" and c["metric"] == "acc")
    assert aa["variant"] == "base_repeat" and aa["n"] == 40 and aa["paired"] is True
    assert abs(aa["delta"]) <= 0.1  # batching alone moves a few items at most
    assert (Path(cfg.run_dir) / "report" / "report.png").is_file()


def test_kl_probe_is_zero_for_a_model_against_itself(model_path, tmp_path):
    """Two separately loaded copies of one model: KL exactly 0 on every generic dialogue, equal reference NLL."""
    from pipeline.probes import drift_probes, generic_rows, load_reference_text

    text = tmp_path / "reference.txt"
    text.write_text("The river ran past the old mill.\n\nShe bought bread, eggs and milk at the market.\n")
    out = drift_probes({"base": model_path, "copy": model_path}, reference_id="base", kl_rows=generic_rows(3),
                       text_rows=load_reference_text(text), max_len=512, log=lambda _: None)
    assert out["copy"]["kl"]["items"]["values"] == [0.0, 0.0, 0.0] and out["copy"]["kl"]["value"] == 0.0
    assert out["copy"]["kl"]["items"]["ids"] == ["generic-00", "generic-01", "generic-02"]
    assert out["copy"]["reference_nll"]["items"]["values"] == out["base"]["reference_nll"]["items"]["values"]
    assert out["base"]["reference_nll"]["n"] == 2 and 0.5 < out["base"]["reference_nll"]["value"] < 10.0


def _post(url: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_lm_eval_with_the_chat_template(served, model_path, tmp_path):
    """eval.apply_chat_template: lm-eval renders each prompt as a user turn of the model's template before scoring."""
    from pipeline.evaluate import run_lm_eval

    cfg, base_url = served
    out = run_lm_eval(base_url=base_url, model_id="base", tokenizer=model_path, tasks=["tgsft_general"],
                      data_dir=None, limit=2, num_fewshot=0, num_concurrent=4, max_length=cfg.model.max_model_len,
                      samples_dir=tmp_path / "samples", apply_chat_template=True)
    assert out["tgsft_general"]["n"] > 0
    records = [json.loads(line) for f in (tmp_path / "samples").glob("samples_*.jsonl") for line in f.open()]
    contexts = [r["arguments"]["gen_args_0"]["arg_0"] for r in records]
    assert contexts and all(c.startswith("<|im_start|>system") and "<|im_start|>user\n" in c
                            and c.rstrip().endswith("<|im_start|>assistant") for c in contexts), contexts[:2]


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
