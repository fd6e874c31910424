"""Forgetting report: how much general ability each tuned model keeps, beside what it gained on the domain.

    tgsft report runs/NAME            # -> runs/NAME/report/{report.json, report.md, report.png}

Reads only the stored eval results ``<run>/eval/*.json`` (one per model id; ``base`` is the reference, every other
id is a tuned variant), so the report can be rebuilt at any time. For every task and metric it lists base, each
variant, the delta (variant - base), retention % and standard errors. Retention % is variant/base for
higher-is-better metrics and base/variant for lower-is-better ones (the retention probe's NLL and perplexity), so
100 % always means "nothing forgotten".
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from pipeline.corpus import atomic_write_bytes, atomic_write_text

__all__ = ["BASE_ID", "build_report", "write_report"]

BASE_ID = "base"
_PRIMARY = ("acc", "exact_match,strict-match", "nll")  # the metric a task is summarised by, first match wins


def _load(eval_dir: Path) -> dict[str, dict]:
    files = sorted(eval_dir.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"{eval_dir}: no eval results (*.json); run `tgsft eval` first")
    results = {}
    for f in files:
        data = json.loads(f.read_text(encoding="utf-8"))
        results[data.get("model_id", f.stem)] = data
    if BASE_ID not in results:
        raise FileNotFoundError(f"{eval_dir}: no results for the base model (model id {BASE_ID!r})")
    return results


def _sections(result: dict) -> dict[tuple[str, str], dict[str, dict]]:
    """``{(section, task): {metric: {"value", "stderr", "higher_is_better"}}}`` of one model's results."""
    out = {("general", task): r["metrics"] for task, r in result.get("tasks", {}).items()}
    if "retention" in result:
        out[("retention", "tg_heldout")] = result["retention"]["metrics"]
    if "domain" in result:
        out[("domain", "domain")] = result["domain"]["metrics"]
    return out


def _retention_pct(base: float | None, value: float | None, higher_is_better: bool) -> float | None:
    if base is None or value is None:
        return None
    num, den = (value, base) if higher_is_better else (base, value)
    return 100.0 * num / den if den else None


def _primary(metrics: dict[str, Any], preferred: str | None = None) -> str:
    for name in (preferred, *_PRIMARY):
        if name in metrics:
            return name
    return sorted(metrics)[0]


def build_report(results: dict[str, dict]) -> dict[str, Any]:
    """Rows and per-variant summary from ``{model_id: eval result}`` (``base`` included).

    Returns:
        ``{"base", "variants", "rows": [...], "summary": {variant: {...}}}``; each row holds one (task, metric)
        with ``base`` and per-variant ``value``, ``stderr``, ``delta`` and ``retention_pct``.
    """
    variants = sorted(m for m in results if m != BASE_ID)
    base_sections = _sections(results[BASE_ID])
    domain_primary = results[BASE_ID].get("domain", {}).get("primary")
    rows = []
    for (section, task), metrics in base_sections.items():
        primary = _primary(metrics, domain_primary if section == "domain" else None)
        for metric, b in sorted(metrics.items()):
            row = {"section": section, "task": task, "metric": metric, "primary": metric == primary,
                   "higher_is_better": b.get("higher_is_better", True),
                   "base": {"value": b["value"], "stderr": b.get("stderr")}, "variants": {}}
            for v in variants:
                m = _sections(results[v]).get((section, task), {}).get(metric)
                value = m["value"] if m else None
                row["variants"][v] = {
                    "value": value, "stderr": m.get("stderr") if m else None,
                    "delta": None if value is None else value - b["value"],
                    # the domain is meant to change: its rows report the gain (delta), not a retention
                    "retention_pct": None if section == "domain" else _retention_pct(b["value"], value,
                                                                                     row["higher_is_better"]),
                }
            rows.append(row)
    summary = {}
    for v in variants:
        general = [r["variants"][v]["retention_pct"] for r in rows if r["section"] == "general" and r["primary"]]
        general = [x for x in general if x is not None]
        domain = next((r for r in rows if r["section"] == "domain" and r["primary"]), None)
        probe = next((r for r in rows if r["section"] == "retention" and r["metric"] == "nll"), None)
        summary[v] = {
            "general_retention_pct": sum(general) / len(general) if general else None,
            "domain_metric": domain["metric"] if domain else None,
            "domain_base": domain["base"]["value"] if domain else None,
            "domain_variant": domain["variants"][v]["value"] if domain else None,
            "domain_gain": domain["variants"][v]["delta"] if domain else None,
            "heldout_nll_delta": probe["variants"][v]["delta"] if probe else None,
        }
    return {"base": BASE_ID, "variants": variants, "rows": rows, "summary": summary}


def _fmt(x: float | None, stderr: float | None = None, *, pct: bool = False) -> str:
    if x is None:
        return "–"
    text = f"{x:.1f} %" if pct else f"{x:.4f}"
    return f"{text} ± {stderr:.4f}" if stderr is not None else text


def _markdown(report: dict[str, Any]) -> str:
    variants = report["variants"]
    lines = ["# Forgetting report", "", "Retention % = variant / base (base / variant for lower-is-better "
             "metrics); 100 % = nothing forgotten. Values ± standard error.", ""]
    if variants:
        lines += ["## Summary", "", "| variant | general retention % (primary metrics) | domain metric | domain base "
                  "| domain variant | domain gain | held-out TG NLL delta |", "|---|---|---|---|---|---|---|"]
        for v, s in report["summary"].items():
            lines.append(f"| {v} | {_fmt(s['general_retention_pct'], pct=True)} | {s['domain_metric'] or '–'} | "
                         f"{_fmt(s['domain_base'])} | {_fmt(s['domain_variant'])} | {_fmt(s['domain_gain'])} | "
                         f"{_fmt(s['heldout_nll_delta'])} |")
        lines.append("")
    head = "| " + " | ".join(["task", "metric", "base", *(f"{v} | Δ {v} | retention % {v}" for v in variants)]) + " |"
    for section, title in (("general", "General benchmarks"), ("retention", "Retention probe (held-out TG "
                           "dialogues, lower is better)"), ("domain", "Domain task")):
        rows = [r for r in report["rows"] if r["section"] == section]
        if not rows:
            continue
        lines += [f"## {title}", "", head, "|" + "---|" * (3 + 3 * len(variants))]
        for r in rows:
            marked = r["metric"] + (" *" if r["primary"] else "")
            cells = [r["task"], marked, _fmt(r["base"]["value"], r["base"]["stderr"])]
            for v in variants:
                c = r["variants"][v]
                cells += [_fmt(c["value"], c["stderr"]), _fmt(c["delta"]), _fmt(c["retention_pct"], pct=True)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("`*` primary metric of the task (used in the summary).")
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [report["base"], *report["variants"]]
    panels = [(s, [r for r in report["rows"] if r["section"] == s and r["primary"]])
              for s in ("general", "retention", "domain")]
    panels = [(s, rows) for s, rows in panels if rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 1.2 * sum(len(r) for _, r in panels), 4.5),
                             gridspec_kw={"width_ratios": [max(len(r), 1) for _, r in panels]}, squeeze=False)
    width = 0.8 / len(models)
    for ax, (section, rows) in zip(axes[0], panels):
        for i, model in enumerate(models):
            cells = [r["base"] if model == report["base"] else r["variants"][model] for r in rows]
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(xs, [c["value"] or 0 for c in cells], width, yerr=[c["stderr"] or 0 for c in cells],
                   capsize=3, label=model)
        ax.set_ylim(bottom=0)  # every metric here is non-negative
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{r['task']}\n{r['metric']}" for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title({"general": "general (higher is better)", "retention": "held-out TG NLL (lower is better)",
                      "domain": "domain (higher is better)"}[section], fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


def write_report(run_dir: Path, *, out_dir: Path | None = None) -> dict:
    """Build the forgetting report of a run from ``<run_dir>/eval/*.json``.

    Args:
        run_dir: run directory holding ``eval/``.
        out_dir: where report.json, report.md and report.png go; default ``<run_dir>/report``.

    Returns:
        The report (as in report.json).

    Raises:
        FileNotFoundError: no eval results, or none for the base model.
    """
    report = build_report(_load(Path(run_dir) / "eval"))
    out_dir = Path(out_dir or Path(run_dir) / "report")
    _plot(report, out_dir / "report.png")  # report.json, the one other tools read, is written last
    atomic_write_text(out_dir / "report.md", _markdown(report))
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    print(f"report: {out_dir}/report.md", flush=True)
    return report
