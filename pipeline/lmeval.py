"""lm-eval against one served model: the task check before anything is served, the run, the per-item scores.

Reads: the endpoint (``/v1/completions``: lm-eval's ``local-completions`` client sends token ids and reads prompt
logprobs), ``eval.data_dir`` for the offline mirrors and ``eval.include_path`` for the user's own task YAMLs.
Writes, into the folder it is given: lm-eval's own results file and per-sample records (``results.json``,
``samples_<task>.jsonl``), as its evaluation tracker writes them (file names without its timestamp).

Multiple-choice tasks gain the continuous metric ``gold_logprob_per_byte``: the log-probability (nats) of the gold
answer's continuation (target delimiter included) divided by its UTF-8 bytes, from the per-sample loglikelihoods.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.serve import ServeError, request_json
from pipeline.stats import mean_stderr

__all__ = ["EndpointError", "check_prompt_logprobs", "check_tasks", "item_scores", "run_lm_eval"]

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
