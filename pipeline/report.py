"""Forgetting report: what each tuned model gained on the domain, what it forgot, and what the TG mix saved.

    tgsft report runs/NAME            # -> runs/NAME/report/{report.json, report.md, report.png}

Reads only the stored eval results ``<run>/eval/*.json`` (one per model id), so the report can be rebuilt at any
time. Model ids with a role: ``base`` is the reference, ``base_repeat`` is base scored a second time (the A/A noise
floor), ``domain_only`` is the control arm trained on the domain data alone; every other id is a tuned variant.

- ``rows``: every task and metric with base, each arm, the delta (arm - base), retention % (arm/base for
  higher-is-better metrics, base/arm for lower-is-better ones, so 100 % means "nothing forgotten") and stderrs.
- ``comparisons``: every delta computed on the same items (paired by item id): mean difference, paired standard
  error, seeded paired bootstrap 95 % interval, n, an exact McNemar p-value for 0/1 metrics, and the A/A delta of
  the same task and metric (``noise_floor``). References are ``base`` for every arm and ``domain_only`` for the TG
  arms.
- ``prevented``: the share of domain-only's drop that the TG arm avoided (:func:`pipeline.stats.prevented_share`),
  per general task and measure, and pooled over the general tasks for the headline measure: the gold answer's
  log-probability per byte, a continuous score that moves before accuracy does (accuracy and KL shares are listed
  too). Nothing is credited when domain-only did not forget measurably: its drop's 95 % interval includes 0 or the
  drop is within the A/A noise floor.
- ``resolution``: per general task, the smallest accuracy change the paired comparison resolves at 2 sigma, and
  whether that reaches 3 points.

The held-out-TG probe is the base model's own output, so it favours every arm trained on TG text; the KL probe on
built-in generic dialogues and the NLL on user-supplied reference text do not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.compare import (AA_ID, BASE_ID, CONTROL_ID, HEADLINE_METRIC, comparisons, prevented, resolution,
                              sections)
from pipeline.corpus import atomic_write_figure, atomic_write_text

__all__ = ["AA_ID", "BASE_ID", "CONTROL_ID", "build_report", "write_report"]

_PRIMARY = ("acc", "exact_match,strict-match", "nll", "kl")  # the metric a task is summarised by, first match wins
_TITLES = {
    "general": "General benchmarks",
    "drift": "KL(base || arm) on built-in generic dialogues (nats per token, lower is closer to base)",
    "reference": "NLL on the user's reference text (lower is better)",
    "retention": "Held-out TG dialogues (NLL, lower is better; biased towards arms trained on TG text)",
    "domain": "Domain task",
}

_SHORT = {"general": "general (higher is better)", "drift": "KL(base || arm)", "reference": "reference-text NLL",
          "retention": "held-out TG NLL\n(biased to TG arms)", "domain": "domain"}


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


def _rows(results: dict[str, dict], arms: list[str]) -> list[dict]:
    base_sections = sections(results[BASE_ID])
    domain_primary = results[BASE_ID].get("domain", {}).get("primary")
    rows = []
    for (section, task), sec in base_sections.items():
        metrics = sec["metrics"]
        primary = _primary(metrics, domain_primary if section == "domain" else None)
        for metric, b in sorted(metrics.items()):
            row = {"section": section, "task": task, "metric": metric, "primary": metric == primary,
                   "higher_is_better": b.get("higher_is_better", True),
                   "base": {"value": b["value"], "stderr": b.get("stderr")}, "variants": {}}
            for v in arms:
                m = sections(results[v]).get((section, task), {}).get("metrics", {}).get(metric)
                value = m["value"] if m else None
                row["variants"][v] = {
                    "value": value, "stderr": m.get("stderr") if m else None,
                    "delta": None if value is None else value - b["value"],
                    # the domain is meant to change and KL is relative to base already: no retention there
                    "retention_pct": None if section in ("domain", "drift") else _retention_pct(
                        b["value"], value, row["higher_is_better"]),
                }
            rows.append(row)
    return rows


def build_report(results: dict[str, dict]) -> dict[str, Any]:
    """Rows, paired comparisons, the prevented share and a per-arm summary from ``{model_id: eval result}``.

    Returns:
        ``{"base", "variants", "noise_floor", "rows", "comparisons", "prevented", "resolution", "summary"}``;
        ``variants`` are the arms (``domain_only`` and the TG arms, not ``base_repeat``).
    """
    arms = sorted((m for m in results if m not in (BASE_ID, AA_ID)), key=lambda m: (m != CONTROL_ID, m))
    rows = _rows(results, arms)
    comps = comparisons(results, arms)
    summary = {}
    for v in arms:
        general = [r["variants"][v]["retention_pct"] for r in rows if r["section"] == "general" and r["primary"]]
        general = [x for x in general if x is not None]
        domain = next((r for r in rows if r["section"] == "domain" and r["primary"]), None)
        probe = next((r for r in rows if r["section"] == "retention" and r["metric"] == "nll"), None)
        mine = {(c["section"], c["task"], c["metric"]): c for c in comps if c["variant"] == v
                and c["reference"] == BASE_ID}
        summary[v] = {
            "general_retention_pct": sum(general) / len(general) if general else None,
            "domain_metric": domain["metric"] if domain else None,
            "domain_base": domain["base"]["value"] if domain else None,
            "domain_variant": domain["variants"][v]["value"] if domain else None,
            "domain_gain": domain["variants"][v]["delta"] if domain else None,
            "domain_gain_ci95": mine[("domain", "domain", domain["metric"])]["ci95"]
            if domain and ("domain", "domain", domain["metric"]) in mine else None,
            "forgetting": [{k: c[k] for k in ("task", "metric", "delta", "ci95", "n", "p_value", "noise_floor")}
                           for (s, _, m), c in mine.items() if s == "general" and m in ("acc", HEADLINE_METRIC)],
            "kl": mine[("drift", "generic_dialogues", "kl")]["delta"]
            if ("drift", "generic_dialogues", "kl") in mine else None,
            "heldout_nll_delta": probe["variants"][v]["delta"] if probe else None,
        }
    return {"base": BASE_ID, "variants": arms, "noise_floor": AA_ID if AA_ID in results else None, "rows": rows,
            "comparisons": comps, "prevented": prevented(results, arms, comps), "resolution": resolution(comps),
            "summary": summary}


def _fmt(x: float | None, stderr: float | None = None, *, pct: bool = False) -> str:
    if x is None:
        return "–"
    text = f"{x:.1f} %" if pct else f"{x:.4f}"
    return f"{text} ± {stderr:.4f}" if stderr is not None else text


def _delta(c: dict | None) -> str:
    if c is None:
        return "–"
    p = f", p={c['p_value']:.3g}" if c.get("p_value") is not None else ""
    return f"{c['delta']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]{p}"


def _headline(report: dict[str, Any]) -> list[str]:
    arms, comps = report["variants"], report["comparisons"]
    vs_base = {(c["variant"], c["section"], c["task"], c["metric"]): c for c in comps if c["reference"] == BASE_ID}
    measures = [(r["section"], r["task"], r["metric"], r["base"]["value"]) for r in report["rows"]
                if (r["section"] == "domain" and r["primary"])
                or (r["section"] == "general" and r["metric"] in ("acc", HEADLINE_METRIC))
                or r["section"] in ("drift", "reference") or (r["section"] == "retention" and r["metric"] == "nll")]
    aa = [AA_ID] if report.get("noise_floor") else []
    label = {"domain": "domain gain", "general": "forgetting", "drift": "drift", "reference": "reference text",
             "retention": "held-out TG (biased to TG arms)"}
    lines = ["## Headline: what did TG save?", "",
             "Δ = arm − base on the same items, [95 % paired bootstrap CI], McNemar p for 0/1 metrics; "
             f"`{AA_ID}` is base scored again with other batching (the A/A noise floor).", "",
             "| measure | task | metric | base | " + " | ".join(f"Δ {a}" for a in arms + aa) + " |",
             "|---|---|---|---|" + "---|" * len(arms + aa)]
    for section, task, metric, base in measures:
        cells = [_delta(vs_base.get((a, section, task, metric))) for a in arms + aa]
        lines.append(f"| {label[section]} | {task} | {metric} | {base:.4f} | " + " | ".join(cells) + " |")
    lines.append("")
    prevented = report.get("prevented")
    if prevented:
        lines += [f"**{prevented['statement']}**", "",
                  f"Share of `{CONTROL_ID}`'s drop prevented by `{prevented['variant']}` (1 = nothing lost, 0 = "
                  "lost as much as domain-only), items resampled jointly:", "",
                  f"| task | metric | {CONTROL_ID} drop [95 % CI] | {prevented['variant']} drop | A/A floor | "
                  "share prevented [95 % CI] | domain-only forgot measurably |", "|---|---|---|---|---|---|---|"]
        for m in prevented["by_measure"]:
            share = "–" if m["share"] is None else f"{100 * m['share']:.0f} %"
            ci = f" [{100 * m['ci95'][0]:.0f} %, {100 * m['ci95'][1]:.0f} %]" if m["ci95"] and m["share"] is not None \
                else ""
            lines.append(f"| {m['task']} | {m['metric']} | {m['control_drop']:+.4f} [{m['control_drop_ci95'][0]:+.4f}, "
                         f"{m['control_drop_ci95'][1]:+.4f}] | {m['variant_drop']:+.4f} | {m['noise_floor']:.4f} | "
                         f"{share}{ci} | {'yes' if m['control_forgot'] else 'no: nothing to credit'} |")
        lines.append("")
    elif arms and CONTROL_ID not in arms:
        lines += [f"No `{CONTROL_ID}` arm (run.control: domain_only): the report cannot say what the TG mix saved.",
                  ""]
    for r in report["resolution"]:
        verdict = "resolves" if r["resolves_3_points"] else "cannot resolve"
        lines.append(f"- {r['task']} accuracy ({r['variant']} vs base, n={r['n']}): paired SE {r['se']:.4f}, smallest "
                     f"change resolved at 2σ {100 * r['mde_2sigma']:.1f} points: it {verdict} a 3-point change.")
    return lines + [""] if report["resolution"] else lines


def _markdown(report: dict[str, Any]) -> str:
    variants = report["variants"]
    lines = ["# Forgetting report", ""]
    if variants:
        lines += _headline(report)
    if report["comparisons"]:
        lines += ["## Paired comparisons", "", "| arm | reference | section | task | metric | Δ [95 % CI] | SE | n | "
                  "A/A Δ |", "|---|---|---|---|---|---|---|---|---|"]
        for c in report["comparisons"]:
            floor = c.get("noise_floor")
            lines.append(f"| {c['variant']} | {c['reference']} | {c['section']} | {c['task']} | {c['metric']} | "
                         f"{_delta(c)} | {c['se']:.4f} | {c['n']} | {_fmt(floor['delta'] if floor else None)} |")
        lines.append("")
    lines += ["Retention % = arm / base (base / arm for lower-is-better metrics); 100 % = nothing forgotten. "
              "Values ± standard error.", ""]
    head = "| " + " | ".join(["task", "metric", "base", *(f"{v} | Δ {v} | retention % {v}" for v in variants)]) + " |"
    for section, title in _TITLES.items():
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
    from pipeline.quality import corpus_markdown

    lines += corpus_markdown(report.get("corpus"))
    lines.append("`*` primary metric of the task.")
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    """Top: primary metric values per model and section. Bottom: paired deltas against base with 95 % intervals
    (each point an arm; grey bands the A/A noise floor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [report["base"], *report["variants"]]
    panels = [(s, [r for r in report["rows"] if r["section"] == s and r["primary"]]) for s in _TITLES]
    panels = [(s, rows) for s, rows in panels if rows]
    deltas = [c for c in report["comparisons"] if c["reference"] == BASE_ID and c["variant"] != AA_ID
              and (c["metric"] in ("acc", HEADLINE_METRIC, "kl") or c["section"] in ("retention", "reference")
                   or (c["section"] == "domain" and c["metric"] == report["summary"].get(c["variant"], {})
                       .get("domain_metric")))]
    width_units = max(sum(len(r) for _, r in panels), 4)
    fig = plt.figure(figsize=(4 + 1.2 * width_units, 9 if deltas else 4.5))
    grid = fig.add_gridspec(2 if deltas else 1, len(panels), width_ratios=[max(len(r), 1) for _, r in panels])
    width = 0.8 / len(models)
    for k, (section, rows) in enumerate(panels):
        ax = fig.add_subplot(grid[0, k])
        for i, model in enumerate(models):
            cells = [r["base"] if model == report["base"] else r["variants"][model] for r in rows]
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(xs, [c["value"] or 0 for c in cells], width, yerr=[c["stderr"] or 0 for c in cells],
                   capsize=3, label=model)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{r['task']}\n{r['metric']}" for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(_SHORT[section], fontsize=9)
        if k == 0:
            ax.legend(fontsize=8)
    if deltas:
        ax = fig.add_subplot(grid[1, :])
        keys = sorted({(c["section"], c["task"], c["metric"]) for c in deltas}, key=lambda k: list(_TITLES).index(k[0]))
        arms = report["variants"]
        for i, arm in enumerate(arms):
            for j, key in enumerate(keys):
                c = next((c for c in deltas if c["variant"] == arm and (c["section"], c["task"], c["metric"]) == key),
                         None)
                if c is None:
                    continue
                y = j + (i - (len(arms) - 1) / 2) * 0.25
                ax.errorbar(c["delta"], y, xerr=[[c["delta"] - c["ci95"][0]], [c["ci95"][1] - c["delta"]]], fmt="o",
                            color=f"C{i + 1}", capsize=3, label=arm if j == 0 else None)
                floor = c.get("noise_floor")
                if floor and floor["delta"]:
                    ax.plot([-abs(floor["delta"]), abs(floor["delta"])], [j, j], color="0.5", lw=6, alpha=0.4)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(keys)))
        ax.set_yticklabels([f"{t} {m}" for _, t, m in keys], fontsize=8)
        ax.set_xlabel("Δ vs base (paired, 95 % CI); grey bar: ± A/A noise floor", fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_figure(fig, path)


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
    from pipeline.quality import corpus_section

    report = build_report(_load(Path(run_dir) / "eval"))
    report["corpus"] = corpus_section(Path(run_dir) / "corpus")  # the TG corpus's quality, beside the forgetting
    out_dir = Path(out_dir or Path(run_dir) / "report")
    _plot(report, out_dir / "report.png")  # report.json, the one other tools read, is written last
    atomic_write_text(out_dir / "report.md", _markdown(report))
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    print(f"report: {out_dir}/report.md", flush=True)
    return report
