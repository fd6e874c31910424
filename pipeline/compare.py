"""Paired comparisons between a run's models: every delta on the same items, the A/A noise floor, and the share of
domain-only's forgetting that a TG arm prevented (see :mod:`pipeline.report` for how they are shown).

Model ids with a role: ``base`` is the reference, ``base_repeat`` is base scored a second time (the A/A noise floor),
``domain_only`` is the control arm; every other id is a tuned variant. Pure: the statistics are
:mod:`pipeline.stats`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AA_ID", "BASE_ID", "CONTROL_ID", "HEADLINE_METRIC", "comparisons", "prevented", "resolution", "sections"]

BASE_ID = "base"
AA_ID = "base_repeat"
CONTROL_ID = "domain_only"
HEADLINE_METRIC = "gold_logprob_per_byte"
BOOTSTRAP_ITERS = 2000
SEED = 0
RESOLVE = 0.03  # the accuracy change (3 points) the general measure should resolve at 2 sigma


def sections(result: dict) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(section, task): {"metrics": {metric: {...}}, "items": {"ids", metric: [...]} or None}}`` of a result."""
    out = {("general", task): {"metrics": r["metrics"], "items": r.get("items")}
           for task, r in result.get("tasks", {}).items()}
    if "kl" in result:
        kl = result["kl"]
        out[("drift", "generic_dialogues")] = {
            "metrics": {"kl": {k: kl[k] for k in ("value", "stderr", "higher_is_better")}},
            "items": {"ids": kl["items"]["ids"], "kl": kl["items"]["values"]}}
    if "reference_nll" in result:
        ref = result["reference_nll"]
        out[("reference", "reference_text")] = {
            "metrics": {"nll": {k: ref[k] for k in ("value", "stderr", "higher_is_better")}},
            "items": {"ids": ref["items"]["ids"], "nll": ref["items"]["values"]}}
    if "retention" in result:
        out[("retention", "tg_heldout")] = {"metrics": result["retention"]["metrics"],
                                            "items": result["retention"].get("items")}
    if "domain" in result:
        out[("domain", "domain")] = {"metrics": result["domain"]["metrics"], "items": result["domain"].get("items")}
    return out


def _paired(results: dict[str, dict], variant: str, reference: str) -> list[dict]:
    """Paired comparisons of ``variant`` against ``reference`` on every task and metric both scored per item."""
    from pipeline.stats import align, mcnemar_exact, paired_diff

    ref_sections, var_sections = sections(results[reference]), sections(results[variant])
    out = []
    for (section, task), ref in ref_sections.items():
        var = var_sections.get((section, task))
        if not var or not ref["items"] or not var["items"]:
            continue
        for metric, m in sorted(ref["metrics"].items()):
            if metric not in ref["items"] or metric not in var["items"]:
                continue
            _, a, b = align(ref["items"]["ids"], ref["items"][metric], var["items"]["ids"], var["items"][metric])
            if not a.size:
                continue
            d = paired_diff(a, b, iters=BOOTSTRAP_ITERS, seed=SEED)
            binary = all(x in (0.0, 1.0) for x in (*a, *b))
            out.append({"variant": variant, "reference": reference, "section": section, "task": task,
                        "metric": metric, "higher_is_better": m.get("higher_is_better", True), "delta": d["delta"],
                        "se": d["se"], "ci95": d["ci95"], "n": d["n"], "paired": True,
                        "p_value": mcnemar_exact(a, b) if binary else None})
    return out


def _kl_vs_base(results: dict[str, dict], variant: str) -> list[dict]:
    """KL(base || variant) is itself a difference from base: its comparison is the mean KL with a bootstrap CI."""
    from pipeline.stats import paired_diff

    kl = results[variant].get("kl")
    if not kl or not kl["items"]["values"]:
        return []
    values = kl["items"]["values"]
    d = paired_diff([0.0] * len(values), values, iters=BOOTSTRAP_ITERS, seed=SEED)
    return [{"variant": variant, "reference": BASE_ID, "section": "drift", "task": "generic_dialogues",
             "metric": "kl", "higher_is_better": False, "delta": d["delta"], "se": d["se"], "ci95": d["ci95"],
             "n": d["n"], "paired": True, "p_value": None}]


def comparisons(results: dict[str, dict], arms: list[str]) -> list[dict]:
    """Paired comparisons: the A/A pass, every arm against base, the TG arms against domain-only; each with the
    A/A delta of the same task and metric as its noise floor."""
    comps = []
    if AA_ID in results:
        comps += _paired(results, AA_ID, BASE_ID)
    floor = {(c["section"], c["task"], c["metric"]): c for c in comps}
    for v in arms:
        comps += [c for c in _paired(results, v, BASE_ID) if c["section"] != "drift"] + _kl_vs_base(results, v)
    if CONTROL_ID in arms:
        comps += [c for v in arms if v != CONTROL_ID for c in _paired(results, v, CONTROL_ID)]
    for c in comps:
        aa = floor.get((c["section"], c["task"], c["metric"]))
        if c["variant"] == AA_ID:
            c["noise_floor"] = None
        elif c["section"] == "drift":  # computed locally in fp32, one sequence at a time: no batching noise
            c["noise_floor"] = {"delta": 0.0, "ci95": [0.0, 0.0], "exact": True}
        else:
            c["noise_floor"] = {"delta": aa["delta"], "ci95": aa["ci95"]} if aa else None
    return comps


def _aligned_triples(results: dict[str, dict], section: str, task: str, metric: str, variant: str) -> tuple | None:
    """(base, control, variant) per-item arrays on the items all three scored, or None."""
    import numpy as np

    if section == "drift":  # KL: base is 0 against itself
        c, v = results[CONTROL_ID].get("kl"), results[variant].get("kl")
        if not c or not v:
            return None
        vmap = dict(zip(v["items"]["ids"], v["items"]["values"]))
        pairs = [(x, vmap[i]) for i, x in zip(c["items"]["ids"], c["items"]["values"]) if i in vmap]
        return (np.zeros(len(pairs)), np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])) \
            if pairs else None
    secs = [sections(results[m]).get((section, task)) for m in (BASE_ID, CONTROL_ID, variant)]
    if any(s is None or not s["items"] or metric not in s["items"] for s in secs):
        return None
    maps = [dict(zip(s["items"]["ids"], s["items"][metric])) for s in secs]
    ids = [i for i in secs[0]["items"]["ids"] if i in maps[1] and i in maps[2]]
    return tuple(np.array([m[i] for i in ids], dtype=float) for m in maps) if ids else None


def prevented(results: dict[str, dict], arms: list[str], comps: list[dict]) -> dict | None:
    """Share of domain-only's drop the first TG arm prevented: headline (pooled) plus per task and measure."""
    from pipeline.stats import prevented_share

    tg_arms = [v for v in arms if v != CONTROL_ID]
    if CONTROL_ID not in arms or not tg_arms:
        return None
    variant = tg_arms[0]
    floor = {(c["section"], c["task"], c["metric"]): c["delta"] for c in comps if c["variant"] == AA_ID}
    general = [t for s, t in sections(results[BASE_ID]) if s == "general"]

    def measure(tasks: list[tuple[str, str]], metric: str, higher: bool) -> dict | None:
        triples = [t for t in (_aligned_triples(results, s, task, metric, variant) for s, task in tasks) if t]
        if not triples:
            return None
        out = prevented_share(triples, higher_is_better=higher, iters=BOOTSTRAP_ITERS, seed=SEED)
        aa = sum(abs(floor.get((s, task, metric), 0.0)) for s, task in tasks)
        lo = out["control_drop_ci95"][0]
        out["control_forgot"] = bool(lo > 0 and out["control_drop"] > aa)
        out["noise_floor"] = aa
        return {"variant": variant, "task": "+".join(t for _, t in tasks) if len(tasks) > 1 else tasks[0][1],
                "metric": metric, "higher_is_better": higher, **out}

    by_measure = []
    for metric in (HEADLINE_METRIC, "acc"):
        per_task = [m for t in general if (m := measure([("general", t)], metric, True))]
        by_measure += per_task
        if len(per_task) > 1:
            by_measure.append(measure([("general", t) for t in general], metric, True))
    kl = measure([("drift", "generic_dialogues")], "kl", False)
    by_measure += [kl] if kl else []
    if not by_measure:
        return None
    pooled = [m for m in by_measure if m["metric"] == HEADLINE_METRIC and "+" in m["task"]]
    single = [m for m in by_measure if m["metric"] == HEADLINE_METRIC]
    head = (pooled or single or by_measure)[0]
    if head["control_forgot"]:
        ci = head["ci95"]
        statement = (f"The TG mix prevented {100 * head['share']:.0f} % of domain-only's drop in {head['metric']} "
                     f"on {head['task']}" + (f" (95 % CI {100 * ci[0]:.0f} % to {100 * ci[1]:.0f} %)." if ci else "."))
    else:
        statement = (f"Domain-only did not forget measurably in {head['metric']} on {head['task']} (drop "
                     f"{head['control_drop']:+.4f}, 95 % CI {head['control_drop_ci95'][0]:+.4f} to "
                     f"{head['control_drop_ci95'][1]:+.4f}; A/A floor {head['noise_floor']:.4f}): nothing can be "
                     "credited to the TG mix.")
    return {"share": head["share"], "ci95": head["ci95"], "variant": variant, "task": head["task"],
            "metric": head["metric"], "control_forgot": head["control_forgot"], "statement": statement,
            "by_measure": by_measure}


def resolution(comps: list[dict]) -> list[dict]:
    """Per general task: 2 x the paired standard error of the accuracy comparisons against base."""
    out = []
    for c in comps:
        if c["section"] == "general" and c["metric"] == "acc" and c["reference"] == BASE_ID and c["variant"] != AA_ID:
            mde = 2 * c["se"]
            out.append({"task": c["task"], "variant": c["variant"], "n": c["n"], "se": c["se"], "mde_2sigma": mde,
                        "resolves_3_points": mde <= RESOLVE})
    return out
