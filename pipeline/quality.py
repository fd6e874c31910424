"""Quality and knowledge-coverage metrics of a TG corpus: what is in it before anyone trains on it.

Reads a corpus directory (``nodes/``, ``dialogues/``, ``manifest.json``); returns a JSON-ready dict that
:func:`pipeline.generate.generate` stores as ``manifest["quality"]`` and ``tgsft inspect`` prints and plots.

Metrics (questions are the kept user turns, or the kept text nodes of a TG-PT corpus; answers the kept assistant
turns):

- ``distinct_1/2/3`` (questions) and ``answer_distinct_1/2/3``: unique n-grams / all n-grams over the (sampled) set
  (lower-cased word and punctuation tokens). 1.0 = no n-gram repeats; N copies of one text give about 1/N.
- ``self_bleu``: mean sentence BLEU (sacrebleu, 0-100) of each sampled question against all other sampled ones.
  100 = every question repeats the others; low = varied wording.
- ``mean_pairwise_cosine``: mean cosine similarity of all distinct pairs of question embeddings (1.0 = identical).
- ``cluster_entropy``: entropy of the k-means cluster histogram of question embeddings divided by log k
  (1.0 = evenly spread over k topics, 0.0 = one topic).
- ``exact_duplicate_rate`` / ``near_duplicate_rate``: share of kept questions whose normalised text repeats another
  one / whose nearest other question has cosine >= ``near_threshold``.
- ``complete_sentence_rate``: share of answers that end in sentence-final punctuation or a closed code block.
- ``lengths``: generated tokens per question, answer and dialogue (mean, percentiles, histogram).
- ``levels``: per level, the shares of nodes that hit the token limit (``truncated_rate``), of those kept after
  being cut back (``trimmed_rate``) and of drops, with the drop reasons.
- ``coverage``: share of reference questions whose nearest TG question has cosine >= ``threshold``, the curve over
  thresholds, and the same per reference source. The reference is any question list: by default the questions of
  the configured eval tasks that tgsft can read offline (:mod:`pipeline.reference`).

Embedding metrics need an ``embed`` function (texts -> L2-normalised (n, d) float32); without one they are None.
Big corpora are sampled with a fixed seed (``max_embed`` questions for embeddings, ``distinct_sample`` texts for
distinct-n, ``bleu_sample`` for self-BLEU); the sample sizes are recorded. Texts stay in Arrow until sampled.
numpy, pyarrow, sacrebleu and scikit-learn only; no torch (Ray only to call an embedder actor).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow.compute as pc

from pipeline.corpus import read_dialogues, read_json, read_nodes
from pipeline.reference import reference_questions
from pipeline.textmetrics import (
    COVERAGE_THRESHOLD,
    Embed,
    cluster_entropy,
    complete_sentence_rate,
    coverage,
    distinct_n,
    duplicate_rates,
    length_stats,
    level_stats,
    mean_pairwise_cosine,
    sample_texts,
    self_bleu,
)

__all__ = [
    "COVERAGE_THRESHOLD",
    "Embed",
    "corpus_markdown",
    "corpus_section",
    "local_embedder",
    "measure",
    "measure_generated",
]



# ----------------------------------------------------------------------------- the whole corpus


def local_embedder(name: str = "embedded", *, log: Callable[[str], None] = print) -> Embed | None:
    """An in-process sentence embedder (default all-MiniLM-L6-v2), loaded at first call; None when the model or
    sentence-transformers is unavailable (embedding metrics are then skipped, with the reason logged)."""
    from pipeline.model import embedder_path

    try:
        from actors.embedder import Embedder

        model = Embedder(embedder_path(name))
    except (ImportError, OSError, ValueError) as e:
        log(f"quality: embedding metrics skipped, the embedder did not load ({type(e).__name__}: {e})")
        return None
    return model.embed


def measure(
    corpus_dir: Path,
    *,
    embed: Embed | None,
    reference: dict[str, list[str]] | None = None,
    threshold: float = COVERAGE_THRESHOLD,
    near_threshold: float = 0.9,
    clusters: int = 16,
    max_embed: int = 10_000,
    distinct_sample: int = 10_000,
    bleu_sample: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Quality and coverage metrics of a corpus directory (see the module docstring).

    Args:
        corpus_dir: a corpus written by ``tgsft generate``.
        embed: texts -> L2-normalised embeddings; None skips the embedding metrics and coverage.
        reference: source name -> reference questions for coverage (None or empty: no coverage).
        threshold: coverage cosine threshold.
        near_threshold: cosine at or above which two questions are near-duplicates.
        clusters: k of the k-means histogram.
        max_embed: questions embedded at most (a seeded sample beyond that).
        distinct_sample: questions (and answers) in the distinct-n sample; distinct-n falls as the sample grows,
            so compare corpora at equal sample sizes.
        bleu_sample: questions in the self-BLEU sample.
        seed: sampling and k-means seed.

    Returns:
        The metrics, JSON-ready.

    Raises:
        FileNotFoundError: no completed level or no dialogues.
    """
    t0 = time.monotonic()
    nodes = read_nodes(corpus_dir).select(["level", "role", "text", "n_tokens", "status", "finish_reason",
                                           "drop_reason"])
    dialogues = read_dialogues(corpus_dir).column("n_tokens").to_numpy()
    kept = nodes.filter(pc.equal(nodes["status"], "kept"))
    q_role = "user" if pc.any(pc.equal(kept["role"], "user")).as_py() else "text"
    questions = kept.filter(pc.equal(kept["role"], q_role))
    answers = kept.filter(pc.equal(kept["role"], "assistant"))
    q_text, a_text = questions.column("text"), answers.column("text")

    out: dict[str, Any] = {"questions": len(q_text), "answers": len(a_text), "dialogues": len(dialogues),
                           "distinct_sample": min(len(q_text), distinct_sample)}
    q_sample, a_sample = sample_texts(q_text, distinct_sample, seed), sample_texts(a_text, distinct_sample, seed)
    for n in (1, 2, 3):
        out[f"distinct_{n}"] = distinct_n(q_sample, n)
    for n in (1, 2, 3):
        out[f"answer_distinct_{n}"] = distinct_n(a_sample, n)
    out["self_bleu"], out["self_bleu_sample"] = self_bleu(q_text, sample=bleu_sample, seed=seed)
    out["complete_sentence_rate"] = complete_sentence_rate(a_text)

    emb = None
    embedded = sample_texts(q_text, max_embed, seed)
    if embed is not None and embedded:
        emb = np.asarray(embed(embedded), dtype=np.float32)
    out["embedded_questions"] = len(embedded) if emb is not None else 0
    out["mean_pairwise_cosine"] = mean_pairwise_cosine(emb) if emb is not None else None
    out["cluster_entropy"], out["cluster_sizes"] = (
        cluster_entropy(emb, clusters=clusters, seed=seed) if emb is not None else (None, []))
    out.update(duplicate_rates(q_text, emb, near_threshold=near_threshold))  # near: over the embedded sample
    out["lengths"] = length_stats(questions.column("n_tokens").to_numpy(), answers.column("n_tokens").to_numpy(),
                                  dialogues)
    out["levels"] = level_stats(nodes)

    out["coverage"] = None
    if emb is not None and reference and any(reference.values()):
        ref_emb = {name: np.asarray(embed(list(qs)), np.float32) for name, qs in reference.items() if qs}
        out["coverage"] = coverage(ref_emb, emb, threshold=threshold)
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out


def measure_generated(
    corpus_dir: Path,
    *,
    embedder: str,
    actor: Any = None,
    tasks: Sequence[str],
    data_dir: str | None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """:func:`measure` at the end of generation, with the run's embedder and eval tasks as the reference.

    Args:
        corpus_dir: the corpus just written.
        embedder: ``tree.dedup.embedder`` (loaded in this process unless ``actor`` is given).
        actor: a running embedder actor (``.embed.remote(texts)``) to use instead.
        tasks: ``eval.tasks``; their offline-readable questions are the coverage reference.
        data_dir: ``eval.data_dir``.
        log: where the summary line goes.
    """
    if actor is not None:
        import ray

        def embed(texts: list[str]) -> np.ndarray:
            return ray.get(actor.embed.remote(texts))
    else:
        embed = local_embedder(embedder, log=log)
    try:
        reference = reference_questions(tasks, data_dir)
    except FileNotFoundError as e:
        log(f"quality: coverage skipped ({e})")
        reference = {}
    q = measure(corpus_dir, embed=embed, reference=reference)
    cov = q["coverage"]
    log(f"quality: distinct-2 {_fmt(q['distinct_2'])}, self-BLEU {_fmt(q['self_bleu'])}, mean pairwise cosine "
        f"{_fmt(q['mean_pairwise_cosine'])}, cluster entropy {_fmt(q['cluster_entropy'])}"
        + (f", coverage of {cov['n']} eval questions {cov['value']:.2f}" if cov else "") + f" ({q['seconds']} s)")
    return q


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


# ----------------------------------------------------------------------------- for the run report

# (key, label) of the headline metrics, in display order
_HEADLINE = [
    ("dialogues", "dialogues"),
    ("questions", "kept questions"),
    ("distinct_2", "distinct-2 (questions)"),
    ("answer_distinct_2", "distinct-2 (answers)"),
    ("self_bleu", "self-BLEU (questions, 0-100)"),
    ("mean_pairwise_cosine", "mean pairwise cosine (questions)"),
    ("cluster_entropy", "cluster entropy (normalised)"),
    ("near_duplicate_rate", "near-duplicate rate"),
    ("complete_sentence_rate", "answers ending in a full sentence"),
]


def corpus_section(corpus_dir: Path) -> dict[str, Any] | None:
    """The corpus metrics a run report shows beside the forgetting numbers, from ``<corpus>/manifest.json``.

    Returns:
        ``{"rows": [{"metric", "value"}, ...], "coverage": {...} | None}``; None when the corpus has no metrics.
    """
    manifest = read_json(Path(corpus_dir) / "manifest.json")
    q = (manifest or {}).get("quality")
    if not q:
        return None
    rows = [{"metric": label, "value": q.get(key)} for key, label in _HEADLINE]
    cov = q.get("coverage")
    if cov:
        rows.append({"metric": f"coverage of {cov['n']} eval questions (cosine >= {cov['threshold']})",
                     "value": cov["value"]})
    return {"rows": rows, "coverage": cov}


def corpus_markdown(section: dict[str, Any] | None) -> list[str]:
    """Markdown lines of :func:`corpus_section` (none for None)."""
    if not section:
        return []
    lines = ["## TG corpus", "", "| metric | value |", "|---|---|"]
    for r in section["rows"]:
        lines.append(f"| {r['metric']} | {_fmt(r['value'])} |")
    return lines + [""]
