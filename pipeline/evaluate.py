"""Evaluate served models: lm-eval tasks, the run's domain task and the probes, one JSON per model.

    tgsft eval CONFIG                                  # serve base (+ tuned) for the eval, then stop
    tgsft eval CONFIG --base-url http://127.0.0.1:8000 --model base=/m/a --model tuned=/m/b

Reads: the endpoint (``/v1/completions`` for lm-eval and the retention probe, ``/v1/chat/completions`` for the
domain task), ``eval.data_dir`` for the offline mirrors, the domain eval files (``data.eval`` in any ``data.format``,
else the built-in domain written to ``<run>/domain``), the TG corpus (``mix.tg_corpus`` or ``<run>/corpus``) and
``eval.reference_text``. Writes, under ``<out>`` (default ``<run>/eval``):

- ``<model_id>.json``: each metric as ``{"value", "stderr", "higher_is_better"}`` and, per task and probe, the
  per-item scores (``items``: ids plus one list per metric) that the report pairs across models;
- ``<model_id>/results.json`` and ``<model_id>/samples_<task>.jsonl``: lm-eval's own results file and per-sample
  records (``log_samples``), as its evaluation tracker writes them (file names without its timestamp);
- ``base_repeat.json`` (+ folder): base scored a second time with ``eval.noise_floor_concurrent`` parallel requests,
  the A/A comparison that shows how far the engine's batching alone moves a score.

lm-eval runs through :mod:`pipeline.lmeval`, which adds to multiple-choice tasks the continuous metric
``gold_logprob_per_byte`` (the gold continuation's log-probability per UTF-8 byte).

Retention probe: mean NLL per token (and perplexity) of the assistant-content tokens of the base model's held-out
TG dialogues (``heldout_ids``, never trained on), each token conditioned on the whole dialogue before it in the
chat template; template control tokens and user turns are context only. It asks the endpoint for prompt logprobs
(``echo=true, logprobs=1, max_tokens=1``) on token ids rendered and tokenized here, so positions align exactly.
``nll_stderr`` is the standard error over dialogues of their mean NLL. The dialogues are the base model's own
output, so the probe favours every arm that trained on TG text.

KL(base || model) on built-in generic dialogues and NLL on ``eval.reference_text`` run locally after the endpoint
is stopped (:mod:`pipeline.probes`).
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from pipeline.config import TGConfig
from pipeline.corpus import atomic_write_text, heldout_ids, read_dialogues
from pipeline.lmeval import EndpointError, check_prompt_logprobs, check_tasks, item_scores, run_lm_eval
from pipeline.serve import default_models, request_json, serving, wait_ready
from pipeline.stats import mean_stderr

__all__ = ["AA_ID", "EndpointError", "check_prompt_logprobs", "check_tasks", "evaluate", "item_scores",
           "retention_probe", "run_domain_task", "run_lm_eval"]

AA_ID = "base_repeat"  # base scored a second time: the A/A noise floor


# ----------------------------------------------------------------------------- domain task


def _domain_items(cfg: TGConfig) -> tuple[str, list[tuple[list[dict], str]]]:
    """(source description, [(prompt messages, reference)]): ``data.eval`` files, else the built-in domain."""
    from pipeline.data import load_examples
    from pipeline.domain import build_domain, split_reference

    paths = [Path(p) for p in cfg.data.eval]
    if not paths:
        paths = [cfg.run_dir / "domain" / "eval.jsonl"]
        if not paths[0].is_file():
            build_domain(paths[0].parent)
    examples = load_examples(paths, fmt=cfg.data.format, bad_rows=cfg.data.bad_rows,
                             max_examples=cfg.eval.domain.limit).examples
    return ", ".join(map(str, paths)), [split_reference(m) for m in examples]


def run_domain_task(
    *, base_url: str, model_id: str, items: list[tuple[list[dict], str]], max_new_tokens: int, num_concurrent: int
) -> dict[str, Any]:
    """Greedy chat completions for every (prompt messages, reference) item, scored by ``domain.score_items``.

    Returns:
        ``{"n", "metrics", "primary", "examples", "items"}``; ``primary`` is ``json_exact`` when references are
        JSON; ``items`` holds ``ids`` (item index) and every metric per item.
    """
    from pipeline.domain import score_item, score_items

    def generate(messages: list[dict]) -> str:
        payload = {"model": model_id, "messages": messages, "max_tokens": max_new_tokens, "temperature": 0}
        out = request_json(f"{base_url}/v1/chat/completions", payload=payload)
        return out["choices"][0]["message"]["content"] or ""

    with ThreadPoolExecutor(max_workers=num_concurrent) as pool:
        predictions = list(pool.map(generate, [messages for messages, _ in items]))
    references = [ref for _, ref in items]
    metrics = score_items(predictions, references)
    examples = [{"prompt": m[-1]["content"] if m else "", "reference": r, "prediction": p}
                for (m, r), p in list(zip(items, predictions))[:5]]
    per_item = [score_item(p, r) for p, r in zip(predictions, references)]
    scores = {"ids": list(range(len(items))), **{m: [float(s[m]) for s in per_item] for m in metrics}}
    return {"n": len(items), "metrics": metrics, "primary": "json_exact" if "json_exact" in metrics else "exact_match",
            "examples": examples, "items": scores}


# ----------------------------------------------------------------------------- retention probe


def _heldout_dialogues(corpus_dir: Path, n: int) -> list[dict[str, Any]]:
    table = read_dialogues(corpus_dir).to_pylist()
    keep = heldout_ids([r["dialogue_id"] for r in table], n)
    return sorted((r for r in table if r["dialogue_id"] in keep), key=lambda r: r["dialogue_id"])


def retention_probe(
    *, base_url: str, model_id: str, tokenizer: str, dialogues: list[dict[str, Any]], max_len: int,
    num_concurrent: int,
) -> dict[str, Any]:
    """Mean token NLL and perplexity of ``model_id`` on held-out TG dialogues (see the module docstring).

    Returns:
        ``{"n_dialogues", "n_tokens", "items": {"ids", "nll"}, "metrics": {"nll": ..., "ppl": ...}}`` (lower is
        better; ``items`` has each dialogue's mean NLL per token).

    Raises:
        EndpointError: no prompt logprobs.
    """
    from transformers import AutoTokenizer

    from pipeline.probes import scored_tokens

    check_prompt_logprobs(base_url, model_id)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    encoded = [scored_tokens(tok, row, max_len) for row in dialogues]

    def nll(item: tuple[list[int], list[bool]]) -> tuple[float, int]:
        ids, mask = item
        payload = {"model": model_id, "prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
        out = request_json(f"{base_url}/v1/completions", payload=payload)
        lps = out["choices"][0]["logprobs"]["token_logprobs"]
        picked = [-lps[i] for i in range(1, len(ids)) if mask[i]]  # position 0 has no logprob
        return sum(picked), len(picked)

    with ThreadPoolExecutor(max_workers=num_concurrent) as pool:
        scored = [(row["dialogue_id"], x) for row, x in zip(dialogues, pool.map(nll, encoded)) if x[1] > 0]
    per_dialogue = [x for _, x in scored]
    total, count = sum(s for s, _ in per_dialogue), sum(n for _, n in per_dialogue)
    means = [s / n for s, n in per_dialogue]
    mean_nll = total / count if count else float("nan")
    se = mean_stderr(means)[1]
    return {
        "n_dialogues": len(per_dialogue),
        "n_tokens": count,
        "items": {"ids": [i for i, _ in scored], "nll": means},
        "metrics": {
            "nll": {"value": mean_nll, "stderr": se, "higher_is_better": False},
            "ppl": {"value": math.exp(mean_nll), "stderr": None if se is None else math.exp(mean_nll) * se,
                    "higher_is_better": False},
        },
    }


# ----------------------------------------------------------------------------- driver


def _evaluate_model(
    cfg: TGConfig, base_url: str, *, served_id: str, source: str, domain: tuple, dialogues: list,
    num_concurrent: int, samples_dir: Path,
) -> dict:
    """Every endpoint-side evaluation of one served model (lm-eval tasks, domain task, retention probe)."""
    ev, t0 = cfg.eval, time.monotonic()
    result: dict[str, Any] = {"model_id": served_id, "model": source, "base_url": base_url, "tasks": {}}
    if ev.tasks:
        result["tasks"] = run_lm_eval(
            base_url=base_url, model_id=served_id, tokenizer=source, tasks=ev.tasks, data_dir=ev.data_dir,
            limit=ev.limit, num_fewshot=ev.num_fewshot, num_concurrent=num_concurrent, batch_size=ev.batch_size,
            max_length=cfg.model.max_model_len, samples_dir=samples_dir, include_path=ev.include_path,
            apply_chat_template=ev.apply_chat_template,
        )
    source_desc, items = domain
    if items:
        result["domain"] = {"source": source_desc, **run_domain_task(
            base_url=base_url, model_id=served_id, items=items, max_new_tokens=ev.domain.max_new_tokens,
            num_concurrent=num_concurrent)}
    if dialogues:
        result["retention"] = retention_probe(
            base_url=base_url, model_id=served_id, tokenizer=source, dialogues=dialogues,
            max_len=cfg.model.max_model_len, num_concurrent=num_concurrent)
    result["seconds"] = round(time.monotonic() - t0, 1)
    result["eval_config"] = ev.model_dump(mode="json") | {"num_concurrent": num_concurrent}
    return result


def _write_result(out_dir: Path, result_id: str, result: dict) -> Path:
    path = out_dir / f"{result_id.replace('/', '--')}.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return path


def _local_probes(cfg: TGConfig, models: dict[str, str], results: dict, *, reference_rows: list, out_dir: Path,
                  log: Callable[[str], None]) -> None:
    """Add the local probes (KL on generic dialogues, NLL on the reference text) to every result and rewrite it."""
    from pipeline.probes import drift_probes, generic_rows

    t0 = time.monotonic()
    probes = drift_probes(models, reference_id="base", kl_rows=generic_rows(cfg.eval.kl_prompts),
                          text_rows=reference_rows, max_len=cfg.model.max_model_len,
                          trust_remote_code=cfg.model.trust_remote_code)
    for model_id, extra in probes.items():
        results[model_id].update(extra)
        _write_result(out_dir, model_id, results[model_id])
    log(f"eval: local probes ({time.monotonic() - t0:.1f} s)")


def evaluate(
    cfg: TGConfig, *, models: dict[str, str], base_url: str | None, out_dir: Path | None,
    corpus_dir: Path | None = None, log: Callable[[str], None] = print,
) -> dict:
    """Evaluate every model and write ``<out_dir>/<model_id>.json`` (and lm-eval's files under ``<model_id>/``).

    With a ``base`` model and ``eval.noise_floor_concurrent`` > 0, base is scored a second time as
    ``base_repeat`` (lm-eval tasks and the retention probe; the A/A noise floor). After the endpoint is done, the
    local probes (KL on ``eval.kl_prompts`` generic dialogues, NLL on ``eval.reference_text``) add ``kl`` and
    ``reference_nll`` to every model's result.

    Args:
        cfg: run config (eval, data, model, serve sections).
        models: model id -> folder or hub id (also the tokenizer); empty: ``base`` and, if trained, ``tuned`` and
            ``domain_only``.
        base_url: a running endpoint serving those ids (checked like `serve` does before any request); None
            serves them for the duration of the eval.
        out_dir: default ``<run>/eval``.
        corpus_dir: TG corpus for the retention probe; default ``mix.tg_corpus`` or ``<run>/corpus``. The probe is
            skipped when the corpus does not exist or ``eval.retention_dialogues`` is 0.
        log: where progress lines go.

    Returns:
        ``{result_id: result}`` as written.

    Raises:
        EndpointError: the endpoint lacks prompt logprobs for loglikelihood tasks or the probe.
        FileNotFoundError: ``eval.data_dir``, a mirror's data file, a domain eval file or ``eval.reference_text``
            is missing.
        ValueError: an unknown task name.
    """
    from pipeline.probes import load_reference_text

    ev = cfg.eval
    check_tasks(ev.tasks, ev.data_dir, ev.include_path)
    reference_rows = load_reference_text(ev.reference_text, fmt=cfg.data.format) if ev.reference_text else []
    if not models:
        models = default_models(cfg)
        control = cfg.run_dir / "train_domain_only" / "model"
        if (control / "config.json").is_file():
            models["domain_only"] = str(control.resolve())
    out_dir = Path(out_dir or cfg.run_dir / "eval")
    corpus_dir = Path(corpus_dir or cfg.mix.tg_corpus or cfg.run_dir / "corpus")
    domain = _domain_items(cfg)
    dialogues = []
    if ev.retention_dialogues and (corpus_dir / "dialogues").is_dir():
        dialogues = _heldout_dialogues(corpus_dir, ev.retention_dialogues)
    # (result id, served id, source, parallel requests, domain items)
    jobs = [(m, m, src, ev.num_concurrent, domain) for m, src in models.items()]
    if ev.noise_floor_concurrent and "base" in models:
        jobs.insert(1 + list(models).index("base"),
                    (AA_ID, "base", models["base"], ev.noise_floor_concurrent, ("", [])))

    def run_all(url: str) -> dict:
        results = {}
        for result_id, served_id, source, concurrent, dom in jobs:
            result = _evaluate_model(cfg, url, served_id=served_id, source=source, domain=dom, dialogues=dialogues,
                                     num_concurrent=concurrent, samples_dir=out_dir / result_id.replace("/", "--"))
            results[result_id] = result | {"model_id": result_id, "served_id": served_id}
            path = _write_result(out_dir, result_id, results[result_id])
            log(f"eval: {result_id} -> {path} ({result['seconds']} s)")
        return results

    if base_url:
        base_url = base_url.rstrip("/").removesuffix("/v1")
        wait_ready(base_url, model_ids=list(models), timeout_s=cfg.serve.ready_timeout_s)
        results = run_all(base_url)
    else:
        log(f"eval: serving {', '.join(models)} (Ray Serve LLM), then scoring {len(jobs)} model(s)")
        with serving(cfg, models) as url:
            results = run_all(url)
    if "base" in models and (ev.kl_prompts or reference_rows):
        _local_probes(cfg, models, results, reference_rows=reference_rows, out_dir=out_dir, log=log)
    return results
