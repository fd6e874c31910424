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

Multiple-choice tasks gain the continuous metric ``gold_logprob_per_byte``: the log-probability (nats) of the gold
answer's continuation (target delimiter included) divided by its UTF-8 bytes, from the per-sample loglikelihoods.

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
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from pipeline.config import TGConfig
from pipeline.corpus import atomic_write_text, heldout_ids, read_dialogues
from pipeline.serve import ServeError, default_models, request_json, serving, wait_ready
from pipeline.stats import mean_stderr

__all__ = ["AA_ID", "EndpointError", "check_prompt_logprobs", "check_tasks", "evaluate", "item_scores",
           "retention_probe", "run_domain_task", "run_lm_eval"]

AA_ID = "base_repeat"  # base scored a second time: the A/A noise floor

# lm-eval output types that score continuations by their log-likelihood (need prompt logprobs)
_LOGLIKELIHOOD = {"multiple_choice", "loglikelihood", "loglikelihood_rolling"}
# mirror task -> its upstream files' key in pipeline.tasks.loaders.FILES, where it is not the name without tgsft_
_DATA_KEY = {"tgsft_truthfulqa_mc1": "truthfulqa", "tgsft_truthfulqa_mc2": "truthfulqa"}


class EndpointError(ValueError):
    """The endpoint cannot serve what an evaluation needs (e.g. no prompt logprobs)."""


def check_prompt_logprobs(base_url: str, model_id: str) -> None:
    """Fail unless ``/v1/completions`` returns a logprob for every prompt token (``echo=true``).

    Raises:
        EndpointError: the request is rejected or the answer lacks prompt-token logprobs.
    """
    payload = {"model": model_id, "prompt": "The sky is blue today.", "max_tokens": 1, "temperature": 0,
               "echo": True, "logprobs": 1}
    hint = (f"{base_url}/v1/completions (model {model_id!r}) must return prompt-token logprobs with echo=true and "
            "logprobs=1 for loglikelihood tasks (multiple choice) and the retention probe; vLLM-based servers "
            "such as `tgsft serve` do")
    try:
        out = request_json(f"{base_url}/v1/completions", payload=payload, timeout=120)
    except (ServeError, OSError) as e:
        raise EndpointError(f"{hint}; the request failed: {e}") from None
    choice = (out.get("choices") or [{}])[0]
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
    if sum(v is not None for v in logprobs) < 2:
        raise EndpointError(f"{hint}; it returned token_logprobs={logprobs!r}")


# ----------------------------------------------------------------------------- lm-eval


def check_tasks(tasks: list[str], data_dir: str | None, include_path: str | None = None) -> None:
    """Fail before any model is served: a missing ``eval.data_dir`` or ``eval.include_path``, a mirror without its
    file, an unknown task (``include_path``: the user's own task YAMLs, known beside the standard ones).

    Raises:
        FileNotFoundError: ``data_dir`` or ``include_path`` is not a directory, or a mirror's upstream file is
            missing (names the path).
        ValueError: a task name lm-eval does not know (with the closest known names).
    """
    import difflib

    from pipeline.tasks import MIRRORS, task_manager
    from pipeline.tasks.loaders import find_file

    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"eval.data_dir: {data_dir} is not a directory")
    if include_path and not Path(include_path).expanduser().is_dir():
        raise FileNotFoundError(f"eval.include_path: {include_path} is not a directory")
    for name in tasks:
        if name in MIRRORS:
            find_file(_DATA_KEY.get(name, name.removeprefix("tgsft_")), data_dir)
    builtin = set(MIRRORS) | {"tgsft_general"}
    if any(name not in builtin for name in tasks):
        known = set(task_manager(data_dir=data_dir, include_path=include_path).all_tasks)
        for name in tasks:
            if name not in known and name not in builtin:
                close = difflib.get_close_matches(name, sorted(known | builtin), n=3)
                raise ValueError(f"eval.tasks: unknown task {name!r}" + (f"; did you mean {', '.join(close)}?"
                                                                        if close else ""))


def _metrics(task_result: dict[str, Any], higher: dict[str, bool]) -> dict[str, dict[str, Any]]:
    out = {}
    for key, value in task_result.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        name, filt = key.split(",", 1)
        stderr = task_result.get(f"{name}_stderr,{filt}")
        out[name if filt == "none" else f"{name},{filt}"] = {
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "higher_is_better": higher.get(name, True),
        }
    return out


def _gold_index(target: Any, continuations: list[str]) -> int | None:
    """Index of the gold continuation, or None (several golds, or the choices sit in the contexts)."""
    if len(continuations) > 1 and len(set(continuations)) == 1:
        return None  # multiple-input task (e.g. WinoGrande): the gold is a context, not a continuation
    if isinstance(target, str) and target.strip().isdigit():
        target = int(target)
    if isinstance(target, int) and 0 <= target < len(continuations):
        return target
    if isinstance(target, str):
        for i, cont in enumerate(continuations):
            if cont.strip() == target.strip():
                return i
    return None


def item_scores(samples: list[dict[str, Any]]) -> dict[str, list]:
    """Per-item scores of one task from lm-eval's in-memory per-sample records (``log_samples``).

    Args:
        samples: records as ``simple_evaluate(log_samples=True)`` returns them (``doc_id``, ``metrics``, one key per
            metric, and for multiple choice ``arguments`` ``[(context, continuation), ...]`` and ``filtered_resps``
            ``[(loglikelihood, is_greedy), ...]``).

    Returns:
        ``{"ids": [doc_id, ...], metric: [value, ...], ...}`` in doc-id order, with ``gold_logprob_per_byte`` for
        multiple-choice records whose gold answer is one continuation; metrics that are not numbers are left out.
    """
    rows = sorted(samples, key=lambda r: r["doc_id"])
    names = [m for m in (rows[0]["metrics"] if rows else []) if all(isinstance(r.get(m), (int, float)) for r in rows)]
    out: dict[str, list] = {"ids": [r["doc_id"] for r in rows], **{m: [float(r[m]) for r in rows] for m in names}}
    gold = []
    for r in rows:
        args, resps = r.get("arguments") or [], r.get("filtered_resps") or []
        pairs = len(args) == len(resps) and all(isinstance(a, (list, tuple)) and len(a) == 2 for a in args)
        if not pairs or not all(isinstance(x, (list, tuple)) and isinstance(x[0], (int, float)) for x in resps):
            break
        conts = [a[1] for a in args]
        i = _gold_index(r.get("target"), conts)
        if i is None or not conts[i]:
            break
        gold.append(float(resps[i][0]) / len(conts[i].encode("utf-8")))
    if rows and len(gold) == len(rows):
        out["gold_logprob_per_byte"] = gold
    return out


def _write_native(tracker: Any, res: dict[str, Any], samples: dict[str, list], out_dir: Path) -> None:
    """lm-eval's results JSON and per-sample JSONL, written by its tracker, renamed to stable names in ``out_dir``."""
    tracker.save_results_aggregated(results=res, samples=samples)
    for task in res["configs"]:
        if task in samples:
            tracker.save_results_samples(task_name=task, samples=samples[task])
    written = Path(tracker.output_path)
    staging = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for f in list(written.rglob("*")):  # results_<date>.json, samples_<task>_<date>.jsonl (maybe another disk)
        if f.name.startswith("results_") and f.suffix == ".json":
            shutil.move(f, staging / "results.json")
        elif f.name.startswith("samples_") and f.suffix == ".jsonl":
            shutil.move(f, staging / f"{f.name.rsplit('_', 1)[0]}.jsonl")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.replace(out_dir)


def run_lm_eval(
    *, base_url: str, model_id: str, tokenizer: str, tasks: list[str], data_dir: str | None, limit: int | None,
    num_fewshot: int | None, num_concurrent: int, batch_size: int = 1, max_length: int,
    samples_dir: Path | None = None, include_path: str | None = None, apply_chat_template: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval (``local-completions``) on ``tasks`` against one served model, keeping per-sample records.

    Args:
        base_url: ``http://host:port``.
        model_id: served model id.
        tokenizer: folder or hub id of the model's tokenizer (requests are sent as token ids).
        tasks: standard task/group names, ``tgsft_*`` mirrors and ``tgsft_general``.
        data_dir: upstream files for the mirrors.
        limit: items per task (None = all).
        num_fewshot: shots (None = each task's default).
        num_concurrent: parallel requests.
        batch_size: lm-eval requests per HTTP call.
        max_length: context length in tokens.
        samples_dir: where lm-eval's results JSON and per-sample JSONL go (None: not written).
        include_path: a folder of the user's own lm-eval task YAMLs.
        apply_chat_template: render prompts with the tokenizer's chat template (few-shot examples as turns).

    Returns:
        ``{task: {"n": items, "metrics": {metric: {"value", "stderr", "higher_is_better"}}, "items": {...}}}``;
        ``items`` as :func:`item_scores` gives them.

    Raises:
        EndpointError: a loglikelihood task is requested and the endpoint returns no prompt logprobs.
        FileNotFoundError: a mirror's upstream file is missing (names task and path).
    """
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    from pipeline.tasks import task_manager

    manager = task_manager(data_dir=data_dir, include_path=include_path)
    built, output_types = [], set()
    for name in tasks:  # load once, keeping groups whole, to learn the output types before any request
        loaded = manager.load([name])
        built += [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
        output_types |= {t.OUTPUT_TYPE for t in loaded["tasks"].values()}
    if output_types & _LOGLIKELIHOOD:
        check_prompt_logprobs(base_url, model_id)
    model_args = {
        "model": model_id, "base_url": f"{base_url}/v1/completions", "tokenizer": tokenizer,
        "tokenizer_backend": "huggingface", "num_concurrent": num_concurrent, "max_retries": 3,
        "max_length": max_length, "timeout": 600,
    }
    with tempfile.TemporaryDirectory(prefix="tgsft-lm-eval-") as tmp:
        tracker = EvaluationTracker(output_path=tmp)
        res = lm_eval.simple_evaluate(
            model="local-completions", model_args=model_args, tasks=built, task_manager=manager, limit=limit,
            batch_size=batch_size, num_fewshot=num_fewshot, log_samples=True, evaluation_tracker=tracker,
            bootstrap_iters=1000, apply_chat_template=apply_chat_template, fewshot_as_multiturn=apply_chat_template,
        )
        samples = res.pop("samples")
        items = {task: item_scores(rows) for task, rows in samples.items()}  # before the tracker rewrites them
        if samples_dir is not None:
            _write_native(tracker, res, samples, Path(samples_dir))
    n_samples = res.get("n-samples", {})
    out = {}
    for task, result in res["results"].items():
        entry = {"n": n_samples.get(task, {}).get("effective"),
                 "metrics": _metrics(result, res.get("higher_is_better", {}).get(task, {}))}
        if task in items:
            entry["items"] = items[task]
            gold = items[task].get("gold_logprob_per_byte")
            if gold:
                entry["metrics"]["gold_logprob_per_byte"] = _mean_se(gold, higher_is_better=True)
        out[task] = entry
    return out


def _mean_se(values: list[float], *, higher_is_better: bool) -> dict[str, Any]:
    mean, stderr = mean_stderr(values)
    return {"value": mean, "stderr": stderr, "higher_is_better": higher_is_better}


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
    from pipeline.probes import drift_probes, generic_rows, load_reference_text

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
        t0 = time.monotonic()
        probes = drift_probes(models, reference_id="base", kl_rows=generic_rows(ev.kl_prompts),
                              text_rows=reference_rows, max_len=cfg.model.max_model_len,
                              trust_remote_code=cfg.model.trust_remote_code)
        for model_id, extra in probes.items():
            results[model_id].update(extra)
            _write_result(out_dir, model_id, results[model_id])
        log(f"eval: local probes ({time.monotonic() - t0:.1f} s)")
    return results
