"""The forgetting study's verdict: ``forgetting_v2.{json,md,png}`` from the kept per-arm scorings.

    .venv/bin/python benchmarks/forgetting_v2.py --arms-dir W/arms             # a forgetting.py work dir's arms
    .venv/bin/python benchmarks/forgetting_v2.py --arms-dir W/arms --tag heldout --name forgetting_v2_heldout

Reads ``<arms-dir>/<arm>/result-<tag>.json`` (or ``.json.gz``), as ``benchmarks/forgetting.py`` writes them (its
``--eval-only --eval-data-dir`` re-scores every kept arm on other splits under another tag), and applies the
pre-registered rules of ``benchmarks/STUDY.md``:

- primary endpoint: the mean over the general tasks of each task's primary metric (``forgetting.PRIMARY_METRIC``),
  as a paired difference on the same items with a 95 % bootstrap interval that resamples every task's items;
- an arm trained with several seeds enters a comparison as its seed mean (per item, the mean score over seeds);
- "TG prevents forgetting" needs ``tg_balance`` minus ``domain`` above 0 with the domain still learned (held-out
  domain NLL within 10 % of domain-only's); the share of domain-only's drop each arm prevented is
  :func:`pipeline.stats.prevented_share`, stated only when domain-only's drop is itself outside noise;
- drift (secondary; lower is better): held-out LIMA NLL, KL to base on generic prompts, NLL on held-out TG
  dialogues and held-out domain NLL, each as a paired difference over the same dialogues (per-dialogue means,
  each dialogue weighing the same) against base and domain-only, with the share of domain-only's rise each arm
  prevented (:func:`drift`).

Nothing is trained or served; the verdict paragraph is written from the numbers.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from forgetting import PRIMARY_METRIC, TASKS, arm_label, paired_vs, parse_label  # noqa: E402

EXTRA_SOURCE = {"tg_balance": "TG Balance-Tree corpus (self-generated)", "tg_wide": "TG Wide-Tree corpus "
                "(self-generated)", "replay_lima": "LIMA human-written conversations", "replay_gsm8k": "GSM8K train"}
# (compared arm, reference arm): every arm against base and domain, plus the study's head-to-head questions
HEAD_TO_HEAD = [("tg_balance", "replay_lima"), ("tg_balance", "domain_lora"), ("tg_balance", "tg_wide"),
                ("tg_balance", "domain_equal_steps")]
SECONDARY = {"domain_nll": ("domain_nll", "nll"), "lima_heldout_nll": ("lima_heldout_nll", "nll")}
# NLL on held-out TG dialogues of the Balance-Tree and Wide-Tree corpora (the model's own kind of text)
RETENTION = {"retention_nll": "retention", "retention_wide_nll": "retention_wide"}
DOMAIN_NLL_TOLERANCE = 0.10
# Per-dialogue drift measures (lower is better): result key and per-item field; the prevented share is taken for
# all but the domain NLL, which is the domain's cost rather than something lost.
DRIFT = {"lima_heldout_nll": ("lima_heldout_nll", "nll"), "kl_to_base": ("kl", "values"),
         "retention_nll": ("retention", "nll"), "retention_wide_nll": ("retention_wide", "nll"),
         "domain_nll": ("domain_nll", "nll")}
DRIFT_PREVENTED = ("lima_heldout_nll", "kl_to_base", "retention_nll", "retention_wide_nll")
DRIFT_NAMES = {"lima_heldout_nll": "held-out LIMA NLL", "kl_to_base": "KL to base",
               "retention_nll": "NLL on held-out Balance-Tree dialogues",
               "retention_wide_nll": "NLL on held-out Wide-Tree dialogues", "domain_nll": "held-out domain NLL"}
EXTRA_ARMS = (*EXTRA_SOURCE, "domain_lora", "domain_equal_steps")


def label_of(folder: str) -> str:
    """Arm label of an arms folder (``forgetting.run_name`` reversed): ``domain-s1`` -> ``domain@s1``."""
    return re.sub(r"-s(\d+)$", r"@s\1", folder)


def load_results(arms_dir: Path, tag: str) -> dict[str, dict]:
    """``{label: result}`` for every arm folder with a ``result-<tag>.json`` or ``.json.gz``."""
    out = {}
    for d in sorted(p for p in arms_dir.iterdir() if p.is_dir()):
        for name, opener in ((f"result-{tag}.json", open), (f"result-{tag}.json.gz", gzip.open)):
            if (d / name).is_file():
                with opener(d / name, "rt") as f:
                    out[label_of(d.name)] = json.load(f)
                break
    return out


def seed_mean(results: dict[str, dict], arm: str) -> tuple[dict | None, list[int]]:
    """A result whose per-item task scores are the mean over the arm's seeds (items every seed scored), and the
    seeds; the arm's only result when it has one seed; None when it has none."""
    labels = [lb for lb in results if parse_label(lb)[0] == arm]
    seeds = sorted(parse_label(lb)[1] for lb in labels)
    if len(labels) < 2:
        return (results[labels[0]] if labels else None), seeds
    tasks = {}
    for task in results[labels[0]]["tasks"]:
        per = [results[lb]["tasks"].get(task, {}).get("items") or {} for lb in labels]
        others = [set(p.get("ids", [])) for p in per[1:]]
        items: dict = {"ids": [i for i in per[0].get("ids", []) if all(i in o for o in others)]}
        for metric in set(per[0]) - {"ids"}:
            if all(metric in p for p in per):
                mean = _mean_by_id([dict(zip(p["ids"], p[metric])) for p in per])
                items[metric] = [mean[i] for i in items["ids"]]
        tasks[task] = {"items": items}
    return {"tasks": tasks}, seeds


def _mean_by_id(looks: list[dict]) -> dict:
    """``{id: mean over looks}`` of ``{id: value}`` dicts, on the ids every look has, in the first look's order."""
    return {i: sum(lk[i] for lk in looks) / len(looks) for i in looks[0] if all(i in lk for lk in looks[1:])}


def _value(result: dict, key: str, metric: str) -> dict | None:
    m = (result.get(key) or {}).get("metrics", {}).get(metric)
    return {"value": m["value"], "stderr": m.get("stderr")} if m else None


def arm_entry(label: str, result: dict, tasks: list[str]) -> dict:
    """One arm and seed as the issue's ``arms`` entry: training facts, per-task results with ``n``, secondaries."""
    arm, seed = parse_label(label)
    train = result.get("train") or {}
    mix = train.get("mix") or {}
    per_task = {}
    for task in tasks:
        t = result.get("tasks", {}).get(task)
        if t:
            per_task[task] = {"n": t.get("n"), "primary_metric": PRIMARY_METRIC.get(task, "acc"),
                              **{m: v["value"] for m, v in t["metrics"].items()}}
    entry = {"name": arm, "seed": seed, "steps": train.get("steps"), "tokens": train.get("tokens"),
             "domain_examples": mix.get("domain_examples"), "extra_source": EXTRA_SOURCE.get(arm),
             "extra_token_share": mix.get("tg_share_tokens") if arm in EXTRA_SOURCE else 0.0,
             "extra_max_uses": mix.get("tg_max_uses") if arm in EXTRA_SOURCE else None,
             "epochs": (train.get("train") or {}).get("epochs"), "tasks": per_task,
             "domain_token_f1": _value(result, "domain", "token_f1"),
             "kl_to_base": ({"value": result["kl"]["value"], "stderr": result["kl"].get("stderr")}
                            if result.get("kl") else None)}
    entry.update({k: _value(result, key, metric) for k, (key, metric) in SECONDARY.items()})
    entry.update({k: _retention(result, key) for k, key in RETENTION.items()})
    return entry


def _retention(result: dict, key: str) -> dict | None:
    """A retention probe's NLL with ``probe``: the probe's identity, so arms scored on another corpus's probe are
    told apart. It is the dialogue digest ``forgetting.py`` keeps (ids and texts), or for a scoring from before
    digests a hash of the dialogue ids."""
    value = _value(result, key, "nll")
    if value is None:
        return None
    digest = result[key].get("dialogues_sha256")
    if digest is None:
        ids = sorted(result[key].get("items", {}).get("ids", []))
        digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    return value | {"probe": digest[:12]}


def mark_retention(entries: list[dict]) -> None:
    """Flag each retention NLL with ``same_probe_as_base``: only those compare with base's and with each other."""
    base = next((e for e in entries if e["name"] == "base"), {})
    for e in entries:
        for k in RETENTION:
            if e[k]:
                e[k]["same_probe_as_base"] = bool(base.get(k)) and e[k]["probe"] == base[k]["probe"]


def seed_means(results: dict[str, dict]) -> dict[str, tuple[dict | None, list[int]]]:
    """:func:`seed_mean` of every arm, in the order the arms first appear."""
    return {a: seed_mean(results, a) for a in dict.fromkeys(parse_label(lb)[0] for lb in results)}


def per_seed(results: dict[str, dict], means: dict, arm: str, ref: str, tasks: list[str]) -> dict | None:
    """The seed spread of a comparison: for an arm or reference with several seeds, each seed pair's primary
    endpoint (seed s of the arm against seed s of the reference where both have it, else against the other side's
    seed mean), keyed by the arm's seed, and ``spread``, the largest minus the smallest delta; None with one seed."""
    seeds, ref_seeds = means[arm][1], means[ref][1]
    if len(seeds) < 2 and len(ref_seeds) < 2:
        return None
    out = {}
    for s in sorted(set(seeds) | set(ref_seeds)):
        a = results[arm_label(arm, s)] if s in seeds else means[arm][0]
        b = results[arm_label(ref, s)] if s in ref_seeds else means[ref][0]
        primary = paired_vs({"a": a, "b": b}, "a", "b", tasks=tasks).get("primary")
        if primary:
            out[str(s)] = {k: primary[k] for k in ("delta", "ci95", "n")}
    deltas = [d["delta"] for d in out.values()]
    return {"seeds": out, "spread": max(deltas) - min(deltas)} if deltas else None


def comparisons(results: dict[str, dict], means: dict[str, tuple[dict | None, list[int]]],
                tasks: list[str]) -> list[dict]:
    """Paired differences (compared minus reference) on the same items (``means``: :func:`seed_means`): every arm
    against base, every other arm against domain, and the head-to-head pairs; each with the primary endpoint, its
    seed spread (:func:`per_seed`) and per-task deltas."""
    arms = list(means)
    pairs = [(a, "base") for a in arms if a != "base"]
    pairs += [(a, "domain") for a in arms if a not in ("base", "domain")]
    pairs += [p for p in HEAD_TO_HEAD if p[0] in arms and p[1] in arms]
    out = []
    for arm, ref in pairs:
        if ref not in means or means[ref][0] is None:
            continue
        pv = paired_vs({arm: means[arm][0], ref: means[ref][0]}, arm, ref, tasks=tasks)
        out.append({"arm": arm, "reference": ref, "seeds": means[arm][1], "reference_seeds": means[ref][1],
                    "primary": pv.get("primary"), "per_seed": per_seed(results, means, arm, ref, tasks),
                    "mean": pv.get("mean"),
                    "tasks": {t: {m: {k: d[k] for k in ("delta", "ci95", "n")} for m, d in v.items()}
                              for t, v in pv["tasks"].items()}})
    return out


def prevented(means: dict[str, tuple[dict | None, list[int]]], tasks: list[str]) -> dict[str, dict]:
    """Per extra arm: the share of domain-only's primary-endpoint drop it prevented (``means``: :func:`seed_means`)."""
    from pipeline.stats import prevented_share

    base, domain = (means.get(a, (None, []))[0] for a in ("base", "domain"))
    if not base or not domain:
        return {}
    out = {}
    for arm, (variant, _) in means.items():
        if arm in ("base", "domain"):
            continue
        if not variant:
            continue
        triples = []
        for task in tasks:
            m = PRIMARY_METRIC.get(task, "acc")
            its = [r["tasks"].get(task, {}).get("items") or {} for r in (base, domain, variant)]
            if all(m in i for i in its):
                look = [dict(zip(i["ids"], i[m])) for i in its]
                ids = [x for x in its[0]["ids"] if x in look[1] and x in look[2]]
                triples.append(tuple([lk[x] for x in ids] for lk in look))
        if triples:
            out[arm] = prevented_share(triples, iters=2000, seed=0)
    return out


def drift_items(results: dict[str, dict], arm: str, key: str, field: str) -> dict | None:
    """``{dialogue id: value}`` of one drift measure, the mean over the arm's seeds on the dialogues every seed
    scored; None when a seed lacks it, or (retention probes) when a seed was scored on another probe than base."""
    looks = []
    base_digest = (results.get("base", {}).get(key) or {}).get("dialogues_sha256")
    for label in (lb for lb in results if parse_label(lb)[0] == arm):
        block = results[label].get(key) or {}
        items = block.get("items") or {}
        if field not in items or (key.startswith("retention") and block.get("dialogues_sha256") != base_digest):
            return None
        looks.append(dict(zip(items["ids"], items[field])))
    return _mean_by_id(looks) if looks else None


def drift(results: dict[str, dict]) -> dict[str, dict]:
    """Per drift measure (DRIFT) and arm: the paired difference over the same dialogues against base and against
    domain-only (``vs_base``, ``vs_domain``: :func:`pipeline.stats.paired_diff`, seed means), and for the measures in
    DRIFT_PREVENTED the share of domain-only's rise the arm prevented (``prevented``)."""
    from pipeline.stats import paired_diff, prevented_share

    arms = list(dict.fromkeys(parse_label(lb)[0] for lb in results))
    out: dict[str, dict] = {}
    for name, (key, field) in DRIFT.items():
        vals = {a: drift_items(results, a, key, field) for a in arms}
        base, dom = vals.get("base"), vals.get("domain")
        rows = {}
        for arm, v in vals.items():
            if arm == "base" or not v:
                continue
            row = {}
            for ref, r in (("base", base), ("domain", dom)):
                if ref != arm and r and (ids := [i for i in v if i in r]):
                    row[f"vs_{ref}"] = paired_diff([r[i] for i in ids], [v[i] for i in ids], seed=0)
            if name in DRIFT_PREVENTED and arm != "domain" and base and dom:
                ids = [i for i in v if i in base and i in dom]
                if ids:
                    row["prevented"] = prevented_share([tuple([x[i] for i in ids] for x in (base, dom, v))],
                                                       higher_is_better=False, iters=2000, seed=0)
            rows[arm] = row
        if rows:
            out[name] = rows
    return out


def _ci(d: dict | None, digits: int = 3) -> str:
    return "–" if not d else f"{d['delta']:+.{digits}f} [{d['ci95'][0]:+.{digits}f}, {d['ci95'][1]:+.{digits}f}]"


def _per_seed_text(x: dict) -> str:
    """``seed 0 +0.010, seed 1 +0.004`` for a comparison with a seed spread, else ''; the seeds are the reference's
    (``against domain seed 0 ...``) when only the reference has several."""
    ps = x.get("per_seed")
    if not ps:
        return ""
    side = f"against {x['reference']} " if len(x["seeds"]) < 2 else ""
    return side + ", ".join(f"seed {s} {d['delta']:+.3f}" for s, d in ps["seeds"].items())


def _share_text(p: dict | None) -> str | None:
    """``74% [71%, 77%]`` for a prevented share with its interval; None when either is undefined."""
    if not p or p.get("share") is None or not p.get("ci95"):
        return None
    return f"{p['share']:.0%} [{p['ci95'][0]:.0%}, {p['ci95'][1]:.0%}]"


def _drift_text(dr: dict[str, dict]) -> str:
    """The verdict's drift sentence: per measure in DRIFT_PREVENTED where domain-only rose above base outside noise,
    that rise and the share of it each extra arm (EXTRA_ARMS) prevented; '' when there is none."""
    parts = []
    for name in DRIFT_PREVENTED:
        rows = dr.get(name, {})
        rise = (rows.get("domain") or {}).get("vs_base")
        if not rise or rise["ci95"][0] <= 0:
            continue
        shares = [f"{arm} {t}" for arm, row in rows.items()
                  if arm in EXTRA_ARMS and (t := _share_text(row.get("prevented")))]
        parts.append(f"{DRIFT_NAMES[name]} +{rise['delta']:.3f} [{rise['ci95'][0]:+.3f}, {rise['ci95'][1]:+.3f}]"
                     + (f", of which {', '.join(shares)} prevented" if shares else ""))
    if not parts:
        return ""
    return ("Drift (secondary; per-dialogue paired differences, seed means): domain-only SFT raised " +
            "; ".join(parts) + ".")


def _side(d: dict) -> int:
    """+1 / -1 when the 95 % interval lies above / below 0, else 0."""
    lo, hi = d["ci95"]
    return 1 if lo > 0 else -1 if hi < 0 else 0


def _against(c: dict, ref: str, lead: str, endings: tuple[str, str, str]) -> str:
    """``<lead>tg_balance minus <ref> <delta [ci]><ending>``, the ending for an interval above 0, spanning 0 or below
    0; '' when that comparison was not made."""
    if ("tg_balance", ref) not in c:
        return ""
    d = c["tg_balance", ref]["primary"]
    return f"{lead}tg_balance minus {ref} {_ci(d)}" + endings[1 - _side(d)]


def _mean_of(entries: list[dict], arm: str, key: str) -> float | None:
    vals = [e[key]["value"] for e in entries if e["name"] == arm and e.get(key)]
    return sum(vals) / len(vals) if vals else None


def verdict(comps: list[dict], prev: dict[str, dict], entries: list[dict], dr: dict | None = None) -> str:
    """The verdict paragraph, by the pre-registered rules (module docstring), from the numbers alone."""
    c = {(x["arm"], x["reference"]): x for x in comps if x.get("primary")}
    dom = c.get(("domain", "base"))
    if not dom:
        return "No domain-only arm has been scored against base: no verdict yet."
    seeds = ", ".join(map(str, dom["seeds"]))
    side = _side(dom["primary"])
    text = [f"On the pre-registered primary endpoint (mean over {len(dom['primary']['tasks'])} general tasks of "
            f"each task's primary metric, {dom['primary']['n']} paired items), domain-only SFT (seed {seeds}) moved "
            f"by {_ci(dom['primary'])} against base" + (f" ({_per_seed_text(dom)})" if dom.get("per_seed") else "")
            + ": " +
            {-1: "a measurable loss.", 0: "no measurable change, so there was no drop for any arm to prevent.",
             1: "a measurable gain, so there was no drop for any arm to prevent."}[side]]
    others = [a for (a, r) in c if r == "base" and a.startswith("domain_") and a not in EXTRA_ARMS]
    if others:
        text.append("Other domain-only settings against base: " +
                    ", ".join(f"{a} {_ci(c[a, 'base']['primary'])}" for a in others) + ".")
    for arm in [a for a in EXTRA_SOURCE if (a, "domain") in c] + [a for a in ("domain_lora", "domain_equal_steps")
                                                                   if (a, "domain") in c]:
        line = f"{arm} minus domain-only: {_ci(c[arm, 'domain']['primary'])}"
        if c[arm, "domain"].get("per_seed"):
            line += f" ({_per_seed_text(c[arm, 'domain'])})"
        share = prev.get(arm) or {}
        if side < 0 and share.get("share") is not None and share.get("ci95"):
            lo, hi = share["ci95"]
            line += f", {share['share']:.0%} of domain-only's drop prevented [{lo:.0%}, {hi:.0%}]"
        text.append(line + ".")
    d_nll = _mean_of(entries, "domain", "domain_nll")
    tg = c.get(("tg_balance", "domain"))
    if tg:
        tg_nll = _mean_of(entries, "tg_balance", "domain_nll")
        learned = d_nll is not None and tg_nll is not None and tg_nll <= d_nll * (1 + DOMAIN_NLL_TOLERANCE)
        rule = _side(tg["primary"])
        if rule > 0 and learned and side < 0:
            claim = "TG prevents forgetting by the pre-registered rule"
        elif rule > 0:
            claim = ("TG scored above domain-only, but the rule's other condition fails (" +
                     ("domain-only did not forget" if side >= 0 else "the domain was not learned as well") + ")")
        else:
            claim = "TG does no better than domain-only" if rule == 0 else "TG forgets more than domain-only"
        text.append(f"{claim} (tg_balance seeds {', '.join(map(str, tg['seeds']))}; held-out domain NLL "
                    f"{tg_nll:.3f} against domain-only's {d_nll:.3f}).")
        for ref, what in (("replay_lima", "human-data replay (LIMA)"), ("domain_lora", "LoRA")):
            text.append(_against(c, ref, f"Against {what}: ", (", TG did better.", ", no measurable difference.",
                                                                f", {ref} did better.")))
        text.append(_against(c, "tg_wide", "Balance-Tree against Wide-Tree: ", (
            ", Balance-Tree did better.", ", no claim (the interval includes 0).", ", Wide-Tree did better.")))
        if steps := c.get(("domain_equal_steps", "domain")):
            a, b = steps["primary"]["ci95"], tg["primary"]["ci95"]
            overlap = a[0] <= b[1] and b[0] <= a[1]
            text.append("Training domain-only for as many steps as tg_balance moved it by "
                        f"{_ci(steps['primary'])} against domain-only: " +
                        ("TG had no effect beyond domain-only, so there is nothing to credit to its extra steps."
                         if rule == 0 else "overlapping TG's effect, so it is credited to the steps."
                         if overlap else "apart from TG's effect, so TG's effect is its content's."))
            text.append(_against(c, "domain_equal_steps", "At the same number of steps, ", (
                ": the TG mix kept more than domain data alone.", ", no measurable difference.",
                ": the TG mix lost more than domain data alone.")))
    if dr and (line := _drift_text(dr)):
        text.append(line)
    costs = [f"{a} {v:.3f}" for a in dict.fromkeys(e["name"] for e in entries)
             if (v := _mean_of(entries, a, "domain_nll")) is not None]
    f1 = [f"{a} {v:.3f}" for a in dict.fromkeys(e["name"] for e in entries)
          if (v := _mean_of(entries, a, "domain_token_f1")) is not None]
    text.append("Domain cost: held-out domain NLL " + ", ".join(costs) + "; greedy token F1 " + ", ".join(f1) + ".")
    if side < 0 and tg:
        holds = _side(tg["primary"]) > 0
        text.append("The paper's claim that mixing the self-generated corpus reduces forgetting "
                    + ("holds at this scale." if holds else "does not hold at this scale."))
    else:
        text.append("The paper's claim cannot be tested at this scale: domain-only SFT in this regime did not "
                    "lose general-task accuracy measurably.")
    return " ".join(t for t in text if t)


def summarize(results: dict[str, dict], tasks: list[str]) -> dict:
    """The ``forgetting_v2`` JSON: arms, items per task, comparisons, prevented shares and the verdict."""
    base = results.get("base", {})
    entries = [arm_entry(label, r, tasks) for label, r in results.items()]
    mark_retention(entries)
    means = seed_means(results)
    comps = comparisons(results, means, tasks)
    prev = prevented(means, tasks)
    dr = drift(results)
    return {"arms": entries,
            "items_per_task": {t: (base.get("tasks", {}).get(t) or {}).get("n") for t in tasks},
            "primary_metric": {t: PRIMARY_METRIC.get(t, "acc") for t in tasks},
            "comparisons": comps, "prevented_share": prev, "drift": dr, "verdict": verdict(comps, prev, entries, dr)}


def _cell(v: dict | None, digits: int = 3) -> str:
    if not v or v.get("same_probe_as_base") is False:
        return "–"
    return f"{v['value']:.{digits}f}" + (f" ± {v['stderr']:.{digits}f}" if v.get("stderr") is not None else "")


def write_markdown(data: dict, tasks: list[str], path: Path, *, title: str) -> None:
    short = {t: t.removeprefix("tgsft_") for t in tasks}
    lines = [f"# {title}", "", data["verdict"], "",
             "| arm | seed | steps | extra | extra token share | " + " | ".join(
                 f"{short[t]} ({data['primary_metric'][t]})" for t in tasks) +
             " | domain NLL | domain F1 | LIMA NLL | own-dialogue NLL (balance / wide) | KL to base |",
             "|---|" * 1 + "---|" * (9 + len(tasks))]
    for e in data["arms"]:
        share = e["extra_token_share"]
        lines.append(f"| {e['name']} | {e['seed']} | {e['steps'] or '–'} | {e['extra_source'] or '–'} | "
                     f"{'–' if share is None else f'{share:.2f}'} | " +
                     " | ".join(f"{e['tasks'][t][e['tasks'][t]['primary_metric']]:.3f}" if t in e["tasks"] else "–"
                                for t in tasks) +
                     f" | {_cell(e['domain_nll'])} | {_cell(e['domain_token_f1'])} | "
                     f"{_cell(e['lima_heldout_nll'])} | {_cell(e['retention_nll'])} / "
                     f"{_cell(e['retention_wide_nll'])} | {_cell(e['kl_to_base'], 4)} |")
    lines += ["", "Paired differences on the same items (compared minus reference; 95 % paired bootstrap interval; "
              "seed means for arms with several seeds):", "",
              "| compared | reference | primary endpoint | per seed (spread) | " + " | ".join(short[t] for t in tasks)
              + " |", "|---|---|---|---|" + "---|" * len(tasks)]
    for x in data["comparisons"]:
        cells = [_ci((x["tasks"].get(t) or {}).get(data["primary_metric"][t])) for t in tasks]
        seeds = f"{_per_seed_text(x)} ({x['per_seed']['spread']:.3f})" if x.get("per_seed") else "–"
        lines.append(f"| {x['arm']} | {x['reference']} | {_ci(x['primary'])} | {seeds} | " + " | ".join(cells) + " |")
    lines += _drift_table(data.get("drift") or {})
    lines += ["", "Items per task: " + ", ".join(f"{short[t]} {n}" for t, n in data["items_per_task"].items()),
              "", "Own-dialogue NLL: mean NLL per token on held-out dialogues of each TG corpus (the retention "
              "probe); – where an arm was scored on another corpus's probe than base (see `probe` in the JSON).", ""]
    path.write_text("\n".join(lines))


def _drift_table(dr: dict[str, dict]) -> list[str]:
    """Markdown lines of the drift table: per arm and measure, the paired difference against base and domain-only
    and the share of domain-only's rise prevented."""
    if not dr:
        return []
    arms = list(dict.fromkeys(a for rows in dr.values() for a in rows))
    lines = ["", "Drift, paired over the same dialogues (arm minus base / arm minus domain-only, per-dialogue means "
             "with 95 % bootstrap intervals; seed means; lower is better) and the share of domain-only's rise "
             "prevented:", "", "| arm | " + " | ".join(DRIFT_NAMES[m] for m in dr) + " |", "|---|" + "---|" * len(dr)]
    for arm in arms:
        cells = []
        for m in dr:
            row = dr[m].get(arm) or {}
            got = [f"{_ci(row[k])} vs {k[3:]}" for k in ("vs_base", "vs_domain") if row.get(k)]
            if share := _share_text(row.get("prevented")):
                got.append(f"{share} prevented")
            cells.append("; ".join(got) or "–")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def plot(data: dict, path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dr = data.get("drift") or {}
    fig, axes = plt.subplots(1, 3 if dr else 2, figsize=(18 if dr else 12, 4.2))
    for ax, ref in zip(axes, ("base", "domain")):
        rows = [x for x in data["comparisons"] if x["reference"] == ref and x.get("primary")]
        ys = [x["primary"]["delta"] for x in rows]
        err = [[y - x["primary"]["ci95"][0] for x, y in zip(rows, ys)],
               [x["primary"]["ci95"][1] - y for x, y in zip(rows, ys)]]
        ax.bar(range(len(rows)), ys, yerr=err, capsize=4, color="tab:blue")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(rows)), [x["arm"] for x in rows], rotation=20, fontsize=8)
        ax.set_ylabel(f"primary endpoint, arm minus {ref}")
        ax.set_title(f"vs {ref} (95 % paired bootstrap)")
    if dr:
        _plot_drift(axes[2], dr)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_drift(ax, dr: dict[str, dict]) -> None:
    """Grouped bars: per drift measure, the share of domain-only's rise each extra arm prevented, with its interval."""
    measures = [m for m in DRIFT_PREVENTED if m in dr]
    arms = [a for a in dict.fromkeys(a for m in measures for a in dr[m]) if a in EXTRA_ARMS]
    width = 0.8 / max(len(arms), 1)
    for k, arm in enumerate(arms):
        got = [(i, p) for i, m in enumerate(measures) if (p := (dr[m].get(arm) or {}).get("prevented"))
               and p.get("share") is not None and p.get("ci95")]
        xs = [i + (k - (len(arms) - 1) / 2) * width for i, _ in got]
        ys = [p["share"] for _, p in got]
        err = [[y - p["ci95"][0] for (_, p), y in zip(got, ys)], [p["ci95"][1] - y for (_, p), y in zip(got, ys)]]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=arm)
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(1, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(measures)), [DRIFT_NAMES[m].replace("NLL on held-out ", "").replace("held-out ", "")
                                         for m in measures], rotation=15, fontsize=8)
    ax.set_ylabel("share of domain-only's rise prevented")
    ax.set_title("drift (per dialogue, 95 % bootstrap)")
    ax.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms-dir", type=Path, required=True, help="folder of <arm>/result-<tag>.json[.gz]")
    p.add_argument("--tag", default="dev", help="which scoring (result-<tag>.json)")
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--name", default="forgetting_v2", help="result file stem")
    p.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--title", default="Does TG-SFT prevent forgetting? (SmolLM2-135M-Instruct, Code Alpaca)")
    args = p.parse_args(argv)
    results = load_results(args.arms_dir, args.tag)
    if "base" not in results:
        raise SystemExit(f"{args.arms_dir}: no base/result-{args.tag}.json[.gz]; nothing to compare against")
    data = {"arms_dir": str(args.arms_dir), "tag": args.tag, **summarize(results, args.tasks)}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / args.name
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    write_markdown(data, args.tasks, out.with_suffix(".md"), title=args.title)
    plot(data, out.with_suffix(".png"), title=args.title)
    print(data["verdict"])
    print(f"wrote {out}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
