"""Evaluate served models: lm-eval tasks, the run's domain task and the retention probe, one JSON per model.

    tgsft eval CONFIG                                  # serve base (+ tuned) for the eval, then stop
    tgsft eval CONFIG --base-url http://127.0.0.1:8000 --model base=/m/a --model tuned=/m/b

Reads: the endpoint (``/v1/completions`` for lm-eval and the probe, ``/v1/chat/completions`` for the domain task),
``eval.data_dir`` for the offline mirrors, the domain eval files (``data.eval`` in any ``data.format``, else the
built-in domain written to ``<run>/domain``) and the TG corpus (``mix.tg_corpus`` or ``<run>/corpus``). Writes ``<out>/<model_id>.json``
(default ``<run>/eval``), each metric as ``{"value", "stderr", "higher_is_better"}``.

Retention probe: mean NLL per token (and perplexity) of the assistant-content tokens of the base model's held-out
TG dialogues (``heldout_ids``, never trained on), each token conditioned on the whole dialogue before it in the
chat template; template control tokens and user turns are context only. It asks the endpoint for prompt logprobs
(``echo=true, logprobs=1, max_tokens=1``) on token ids rendered and tokenized here, so positions align exactly.
``nll_stderr`` is the standard error over dialogues of their mean NLL.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.config import TGConfig
from pipeline.corpus import atomic_write_text, heldout_ids, read_dialogues
from pipeline.serve import ServeError, default_models, request_json, serving, wait_ready

__all__ = ["EndpointError", "check_prompt_logprobs", "check_tasks", "evaluate", "retention_probe", "run_domain_task",
           "run_lm_eval"]

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


def check_tasks(tasks: list[str], data_dir: str | None) -> None:
    """Fail before any model is served: a missing ``eval.data_dir``, a mirror without its file, an unknown task.

    Raises:
        FileNotFoundError: ``data_dir`` is not a directory, or a mirror's upstream file is missing (names the path).
        ValueError: a task name lm-eval does not know (with the closest known names).
    """
    import difflib

    from pipeline.tasks import MIRRORS, task_manager
    from pipeline.tasks.loaders import find_file

    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"eval.data_dir: {data_dir} is not a directory")
    for name in tasks:
        if name in MIRRORS:
            find_file(_DATA_KEY.get(name, name.removeprefix("tgsft_")), data_dir)
    builtin = set(MIRRORS) | {"tgsft_general"}
    if any(name not in builtin for name in tasks):
        known = set(task_manager(data_dir=data_dir).all_tasks)
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


def run_lm_eval(
    *, base_url: str, model_id: str, tokenizer: str, tasks: list[str], data_dir: str | None, limit: int | None,
    num_fewshot: int | None, num_concurrent: int, batch_size: int = 1, max_length: int,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval (``local-completions``) on ``tasks`` against one served model.

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

    Returns:
        ``{task: {"n": items, "metrics": {metric: {"value", "stderr", "higher_is_better"}}}}``.

    Raises:
        EndpointError: a loglikelihood task is requested and the endpoint returns no prompt logprobs.
        FileNotFoundError: a mirror's upstream file is missing (names task and path).
    """
    import lm_eval

    from pipeline.tasks import task_manager

    manager = task_manager(data_dir=data_dir)
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
    res = lm_eval.simple_evaluate(
        model="local-completions", model_args=model_args, tasks=built, task_manager=manager, limit=limit,
        batch_size=batch_size, num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=1000,
    )
    n_samples = res.get("n-samples", {})
    return {
        task: {
            "n": n_samples.get(task, {}).get("effective"),
            "metrics": _metrics(result, res.get("higher_is_better", {}).get(task, {})),
        }
        for task, result in res["results"].items()
    }


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
        ``{"n", "metrics", "primary", "examples"}``; ``primary`` is ``json_exact`` when references are JSON.
    """
    from pipeline.domain import score_items

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
    return {"n": len(items), "metrics": metrics, "primary": "json_exact" if "json_exact" in metrics else "exact_match",
            "examples": examples}


# ----------------------------------------------------------------------------- retention probe


def _heldout_dialogues(corpus_dir: Path, n: int) -> list[dict[str, Any]]:
    table = read_dialogues(corpus_dir).to_pylist()
    keep = heldout_ids([r["dialogue_id"] for r in table], n)
    return sorted((r for r in table if r["dialogue_id"] in keep), key=lambda r: r["dialogue_id"])


def _scored_tokens(tok: Any, row: dict[str, Any], max_len: int) -> tuple[list[int], list[bool]]:
    """Token ids of a dialogue and which of them are scored (assistant content; all tokens for plain text)."""
    if row.get("messages"):
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        text = tok.apply_chat_template(messages, tokenize=False)
        spans, cursor = [], 0
        for m in messages:
            content = m["content"].strip()
            pos = text.find(content, cursor)
            if pos < 0:
                raise ValueError(f"dialogue {row['dialogue_id']}: chat template changed a message's text")
            if m["role"] == "assistant":
                spans.append((pos, pos + len(content)))
            cursor = pos + len(content)
    else:
        text = row.get("text") or ""
        spans = [(0, len(text))]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][: max_len - 1]  # leave room for the 1 generated token
    mask = [any(s < end and e > start for start, end in spans) for s, e in enc["offset_mapping"][: len(ids)]]
    return ids, mask


def retention_probe(
    *, base_url: str, model_id: str, tokenizer: str, dialogues: list[dict[str, Any]], max_len: int,
    num_concurrent: int,
) -> dict[str, Any]:
    """Mean token NLL and perplexity of ``model_id`` on held-out TG dialogues (see the module docstring).

    Returns:
        ``{"n_dialogues", "n_tokens", "metrics": {"nll": ..., "ppl": ...}}`` (lower is better).

    Raises:
        EndpointError: no prompt logprobs.
    """
    from transformers import AutoTokenizer

    check_prompt_logprobs(base_url, model_id)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    encoded = [_scored_tokens(tok, row, max_len) for row in dialogues]

    def nll(item: tuple[list[int], list[bool]]) -> tuple[float, int]:
        ids, mask = item
        payload = {"model": model_id, "prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
        out = request_json(f"{base_url}/v1/completions", payload=payload)
        lps = out["choices"][0]["logprobs"]["token_logprobs"]
        picked = [-lps[i] for i in range(1, len(ids)) if mask[i]]  # position 0 has no logprob
        return sum(picked), len(picked)

    with ThreadPoolExecutor(max_workers=num_concurrent) as pool:
        per_dialogue = [x for x in pool.map(nll, encoded) if x[1] > 0]
    total, count = sum(s for s, _ in per_dialogue), sum(n for _, n in per_dialogue)
    means = [s / n for s, n in per_dialogue]
    mean_nll = total / count if count else float("nan")
    var = sum((m - sum(means) / len(means)) ** 2 for m in means) / (len(means) - 1) if len(means) > 1 else 0.0
    se = math.sqrt(var / len(means)) if means else None
    return {
        "n_dialogues": len(per_dialogue),
        "n_tokens": count,
        "metrics": {
            "nll": {"value": mean_nll, "stderr": se, "higher_is_better": False},
            "ppl": {"value": math.exp(mean_nll), "stderr": None if se is None else math.exp(mean_nll) * se,
                    "higher_is_better": False},
        },
    }


# ----------------------------------------------------------------------------- driver


def _evaluate_model(cfg: TGConfig, base_url: str, model_id: str, source: str, domain: tuple, dialogues: list) -> dict:
    ev, t0 = cfg.eval, time.monotonic()
    result: dict[str, Any] = {"model_id": model_id, "model": source, "base_url": base_url, "tasks": {}}
    if ev.tasks:
        result["tasks"] = run_lm_eval(
            base_url=base_url, model_id=model_id, tokenizer=source, tasks=ev.tasks, data_dir=ev.data_dir,
            limit=ev.limit, num_fewshot=ev.num_fewshot, num_concurrent=ev.num_concurrent, batch_size=ev.batch_size,
            max_length=cfg.model.max_model_len,
        )
    source_desc, items = domain
    if items:
        result["domain"] = {"source": source_desc, **run_domain_task(
            base_url=base_url, model_id=model_id, items=items, max_new_tokens=ev.domain.max_new_tokens,
            num_concurrent=ev.num_concurrent)}
    if dialogues:
        result["retention"] = retention_probe(
            base_url=base_url, model_id=model_id, tokenizer=source, dialogues=dialogues,
            max_len=cfg.model.max_model_len, num_concurrent=ev.num_concurrent)
    result["seconds"] = round(time.monotonic() - t0, 1)
    result["eval_config"] = ev.model_dump(mode="json")
    return result


def evaluate(
    cfg: TGConfig, *, models: dict[str, str], base_url: str | None, out_dir: Path | None,
    corpus_dir: Path | None = None,
) -> dict:
    """Evaluate every model and write ``<out_dir>/<model_id>.json``.

    Args:
        cfg: run config (eval, data, model, serve sections).
        models: model id -> folder or hub id (also the tokenizer); empty: ``base`` and, if trained, ``tuned``.
        base_url: a running endpoint serving those ids (checked like `serve` does before any request); None
            serves them for the duration of the eval.
        out_dir: default ``<run>/eval``.
        corpus_dir: TG corpus for the retention probe; default ``mix.tg_corpus`` or ``<run>/corpus``. The probe is
            skipped when the corpus does not exist or ``eval.retention_dialogues`` is 0.

    Returns:
        ``{model_id: result}`` as written.

    Raises:
        EndpointError: the endpoint lacks prompt logprobs for loglikelihood tasks or the probe.
        FileNotFoundError: ``eval.data_dir``, a mirror's data file or a domain eval file is missing.
        ValueError: an unknown task name.
    """
    check_tasks(cfg.eval.tasks, cfg.eval.data_dir)
    models = models or default_models(cfg)
    out_dir = Path(out_dir or cfg.run_dir / "eval")
    corpus_dir = Path(corpus_dir or cfg.mix.tg_corpus or cfg.run_dir / "corpus")
    domain = _domain_items(cfg)
    dialogues = []
    if cfg.eval.retention_dialogues and (corpus_dir / "dialogues").is_dir():
        dialogues = _heldout_dialogues(corpus_dir, cfg.eval.retention_dialogues)

    def run_all(url: str) -> dict:
        results = {}
        for model_id, source in models.items():
            results[model_id] = _evaluate_model(cfg, url, model_id, source, domain, dialogues)
            path = out_dir / f"{model_id.replace('/', '--')}.json"
            atomic_write_text(path, json.dumps(results[model_id], indent=2) + "\n")
            print(f"eval: {model_id} -> {path} ({results[model_id]['seconds']} s)", flush=True)
        return results

    if base_url:
        base_url = base_url.rstrip("/").removesuffix("/v1")
        wait_ready(base_url, model_ids=list(models), timeout_s=cfg.serve.ready_timeout_s)
        return run_all(base_url)
    with serving(cfg, models) as url:
        return run_all(url)
