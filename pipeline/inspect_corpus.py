"""``tgsft inspect``: the quality and coverage metrics of one corpus, or of two side by side.

    tgsft inspect runs/local/corpus                                   # -> runs/local/corpus/inspect.{json,png}
    tgsft inspect runs/wide/corpus --compare runs/deep/corpus --reference /data/eval --out /tmp/cmp

Reads the corpus directories and the reference questions (``--reference``: a file or an eval data directory, see
:func:`pipeline.reference.read_reference`; default ``tgsft_general``'s questions). Writes ``inspect.json`` (every
metric of every corpus) and ``inspect.png`` (length histograms, cluster sizes, coverage curve), and prints a table.
Embeddings come from all-MiniLM-L6-v2 loaded in this process; without it the embedding metrics are left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline import quality
from pipeline.corpus import atomic_write_figure, atomic_write_text
from pipeline.reference import read_reference, reference_questions

__all__ = ["inspect_corpora", "table_rows"]

# (label, getter) of the printed rows
_ROWS: list[tuple[str, Callable[[dict], Any]]] = [
    ("dialogues", lambda q: q["dialogues"]),
    ("kept questions / answers", lambda q: f"{q['questions']} / {q['answers']}"),
    ("distinct-1 / 2 / 3 questions", lambda q: " / ".join(_f(q[f"distinct_{n}"], 3) for n in (1, 2, 3))),
    ("distinct-1 / 2 / 3 answers", lambda q: " / ".join(_f(q[f"answer_distinct_{n}"], 3) for n in (1, 2, 3))),
    ("self-BLEU questions (0-100)", lambda q: _f(q["self_bleu"], 2)),
    ("mean pairwise cosine", lambda q: _f(q["mean_pairwise_cosine"])),
    ("cluster entropy (normalised)", lambda q: _f(q["cluster_entropy"])),
    ("exact / near-duplicate rate", lambda q: f"{_f(q['exact_duplicate_rate'])} / {_f(q['near_duplicate_rate'])}"),
    ("answers ending a sentence", lambda q: _f(q["complete_sentence_rate"])),
    ("question tokens mean / p90", lambda q: _len(q, "question")),
    ("answer tokens mean / p90", lambda q: _len(q, "answer")),
    ("dialogue tokens mean / p90", lambda q: _len(q, "dialogue")),
    ("truncated / dropped (all levels)", lambda q: _rates(q["levels"])),
    ("coverage", lambda q: _f(q["coverage"]["value"]) if q["coverage"] else "–"),
    ("mean nearest cosine", lambda q: _f(q["coverage"]["mean_nearest"]) if q["coverage"] else "–"),
]


def _f(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _len(q: dict, kind: str) -> str:
    s = q["lengths"][kind]
    return f"{s['mean']:.1f} / {s['p90']:.0f}" if s else "–"


def _rates(levels: dict[str, dict]) -> str:
    n = sum(lv["generated"] for lv in levels.values())
    cut = sum(lv["truncated_rate"] * lv["generated"] for lv in levels.values())
    dropped = sum(lv["generated"] - lv["kept"] for lv in levels.values())
    return f"{cut / n:.3f} / {dropped / n:.3f}" if n else "–"


def table_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table of ``{label: quality metrics}``."""
    header = ["metric", *results]
    rows = [[label, *(str(get(q)) for q in results.values())] for label, get in _ROWS]
    if any(q["coverage"] for q in results.values()):
        sources = sorted({s for q in results.values() if q["coverage"] for s in q["coverage"]["by_source"]})
        for s in sources:
            rows.append([f"  coverage {s}", *(_f(q["coverage"]["by_source"].get(s, {}).get("value"))
                                             if q["coverage"] else "–" for q in results.values())])
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _labels(corpora: Sequence[Path]) -> list[str]:
    names = [p.name for p in corpora]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in corpora]  # e.g. two runs' "corpus" folders


def _plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, kind in zip(axes[0], ("question", "answer")):
        for label, q in results.items():
            h = q["lengths"][kind]
            if h:
                ax.stairs(h["histogram"]["counts"], h["histogram"]["edges"], label=label)
        ax.set_title(f"{kind} length (generated tokens)", fontsize=9)
        ax.set_ylabel("nodes")
    ax = axes[1][0]
    width = 0.8 / len(results)
    for i, (label, q) in enumerate(results.items()):
        sizes = q["cluster_sizes"]
        ax.bar(np.arange(len(sizes)) + (i - (len(results) - 1) / 2) * width, sizes, width, label=label)
    ax.set_title("k-means clusters of question embeddings (largest first)", fontsize=9)
    ax.set_ylabel("questions")
    ax = axes[1][1]
    for label, q in results.items():
        if q["coverage"]:
            t, share = zip(*q["coverage"]["curve"])
            ax.plot(t, share, marker="o", ms=3, label=label)
    ax.set_title("coverage: share of reference questions with a TG question at cosine >= t", fontsize=9)
    ax.set_xlabel("t")
    ax.set_ylim(0, 1.02)
    for a in axes.flat:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_figure(fig, path)


def inspect_corpora(
    corpora: Sequence[Path],
    *,
    reference: str | None = None,
    threshold: float = quality.COVERAGE_THRESHOLD,
    out_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure each corpus, print the table and write ``inspect.{json,png}``.

    Args:
        corpora: one or two (or more) corpus directories, shown in this order.
        reference: reference questions for coverage (file or eval data directory); None: ``tgsft_general``'s.
        threshold: coverage cosine threshold.
        out_dir: where inspect.json and inspect.png go; default the first corpus directory.
        log: where the table goes.

    Returns:
        ``{"reference": {source: n}, "threshold", "corpora": {label: {"path", "quality"}}}`` (= inspect.json).

    Raises:
        FileNotFoundError: a corpus without completed levels or dialogues, or a missing reference.
        ValueError: a reference row without a question.
    """
    corpora = [Path(c) for c in corpora]
    ref = read_reference(reference) if reference else reference_questions(["tgsft_general"], None)
    model = quality.local_embedder(log=log)
    cache: dict[str, np.ndarray] = {}

    def embed(texts: list[str]) -> np.ndarray:  # the reference is embedded once for all corpora
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            cache.update(zip(missing, model(missing)))
        return np.stack([cache[t] for t in texts])

    results = {}
    for label, path in zip(_labels(corpora), corpora):
        results[label] = quality.measure(path, embed=embed if model else None, reference=ref, threshold=threshold)
    header, rows = table_rows(results)
    log(_markdown(header, rows))
    log(f"coverage: {sum(len(v) for v in ref.values())} reference questions ({', '.join(ref)}), cosine >= "
        f"{threshold}")
    out = {"reference": {k: len(v) for k, v in ref.items()}, "threshold": threshold,
           "corpora": {label: {"path": str(p), "quality": results[label]} for label, p in zip(results, corpora)}}
    out_dir = Path(out_dir or corpora[0])
    _plot(results, out_dir / "inspect.png")
    atomic_write_text(out_dir / "inspect.json", json.dumps(out, indent=2) + "\n")
    log(f"inspect: {out_dir}/inspect.json, {out_dir}/inspect.png")
    return out
