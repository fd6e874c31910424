"""Forgetting experiment: does mixing a TG corpus into domain SFT keep the general knowledge of the model?

    nice -n 10 .venv/bin/python benchmarks/forgetting.py --shared-data ../shared/data > /tmp/forgetting.log 2>&1
    .venv/bin/python benchmarks/forgetting.py --eval-only --eval-data-dir /other/eval --tag heldout   # re-score
    .venv/bin/python benchmarks/forgetting.py --seeds 0 1 2 --arms domain tg_balance   # more training seeds

Arms, all with the same domain data (the same Code Alpaca examples; the same epochs unless said otherwise):

- ``base``: SmolLM2-135M-Instruct, no training;
- ``domain``: domain SFT only;
- ``tg_balance`` / ``tg_wide``: domain + a TG corpus the model wrote itself (Balance-Tree / Wide-Tree shapes);
- ``replay_gsm8k``: domain + the same number of extra tokens of GSM8K train Q/A dialogues (human-written, not
  self-generated, and not evaluated): separates "TG preserved knowledge" from "any extra, non-domain training
  helps" (e.g. by healing the 4-bit quantization noise of the embedded model);
- ``replay_lima``: domain + the same extra-token share of human-written LIMA conversations
  (``<shared-data>/sft/lima/lima_data.jsonl``; a trailing user turn is dropped so every dialogue ends with the
  assistant). ``--lima-heldout`` rows (a seed-0 choice) are never replayed: every arm's NLL on them is
  ``lima_heldout_nll``. Without the file the arm and the metric are skipped, unless ``--arms`` names the arm (error);
- ``domain_lora``: domain only, LoRA (r 16, alpha 32, dropout 0.05, the default target modules) at the same lr as
  every arm unless ``--lora-lr`` is given; the merged export is served like the others;
- ``domain_equal_steps``: domain only, as many optimizer steps as ``tg_balance`` of the same seed took (its train
  manifest's ``steps`` as ``train.max_steps``, with enough epochs to reach it, or the ``train`` block of its kept
  scoring when the model is gone); trains tg_balance first if it has neither.

``--seeds`` trains every arm once per seed (``train.seed`` and ``mix.seed``): seed 0 keeps the arm's name and folder,
seed s is ``<arm>@s<s>`` in ``arms/<arm>-s<s>/`` (also its served model id); ``base`` is never re-seeded.

Stages are the project's own: ``pipeline.generate`` (one corpus per tree shape, shared by arms and by the retention
probe), ``pipeline.train`` (Ray Train + DeepSpeed), ``pipeline.serve`` + ``pipeline.evaluate`` (Ray Serve LLM + lm-eval
on the offline mirrors, the domain task and the retention probe). The general tasks read ``--eval-data-dir``
(default ``<shared-data>/eval``), so other splits in the same upstream formats are scored without code changes.

Extra measurements beside ``evaluate``: the domain NLL (mean NLL per assistant token of held-out Code Alpaca
examples, the retention probe's code on domain dialogues), the same NLL on the LIMA held-out rows, the
retention probe on the Wide-Tree corpus too, and KL(base || arm) on ``eval.kl_prompts`` generic dialogues. The
summary adds, per arm against ``base`` and against ``domain`` (the same seed's when scored), paired differences on the same items for each task's acc and acc_norm and their mean over
tasks (95 % paired bootstrap intervals, ``pipeline.stats``), and min / max / mean over seeds of re-seeded arms.

Everything is written under ``--work-dir`` (default /tmp/tgsft-forgetting): ``data/``, ``corpus_<preset>/``,
``arms/<arm>/train/model`` and ``arms/<arm>/result-<tag>.json``. Each step is skipped when its output exists, so a
crash only redoes the unfinished arm. All arms are trained first, then scored ``--serve-group`` at a time on one Ray
Serve app (one start-up per group). A kept scoring is reused; when a retention probe's corpus was made anew since,
only that probe is scored again. The summary goes to ``benchmarks/results/<name>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIG = Path(__file__).resolve().parent / "forgetting" / "forgetting.yaml"
# in run order: cheapest answers first; domain_equal_steps needs tg_balance's step count
ARMS = ["base", "domain", "tg_balance", "replay_gsm8k", "tg_wide", "replay_lima", "domain_lora", "domain_equal_steps"]
CORPUS_OF = {"tg_balance": "corpus_balance", "tg_wide": "corpus_wide", "replay_gsm8k": "corpus_replay_gsm8k",
             "replay_lima": "corpus_replay_lima"}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}  # default target modules (pipeline.sections.LoraConfig)
LIMA_FILE = Path("sft") / "lima" / "lima_data.jsonl"
LIMA_SPLIT_SEED = 0
PAIRED_METRICS = ("acc", "acc_norm")
# The pre-registered primary metric per task (benchmarks/STUDY.md): length-normalised where it is usually reported.
PRIMARY_METRIC = {"tgsft_arc_easy": "acc_norm", "tgsft_arc_challenge": "acc_norm", "tgsft_piqa": "acc_norm",
                  "tgsft_sciq": "acc", "tgsft_winogrande": "acc"}
BOOTSTRAP_ITERS = 2000
# Both shapes get the same generation budget, 6r nodes: balance r + r + 2r + 2r (2r dialogues), wide 4 x 1.5r
# (1.5r dialogues, each with its own opening question).
PRESETS = {"balance": lambda r: [r, 1, 2, 1], "wide": lambda r: [3 * r // 2, 1, 1, 1]}
TASKS = ["tgsft_arc_easy", "tgsft_arc_challenge", "tgsft_piqa", "tgsft_sciq", "tgsft_winogrande"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- data


def prepare_domain(shared: Path, work: Path, *, n_train: int, n_heldout: int, seed: int = 0) -> tuple[Path, Path]:
    """Code Alpaca 2k, shuffled with ``seed``: the first ``n_heldout`` rows are held out, the next ``n_train`` train.
    Rows with an empty output (2 upstream; the loader rejects them) are left out after the shuffle, so every other
    row keeps its place.

    Both files keep the upstream Alpaca format, so the stage's own loader converts them.
    """
    src = shared / "sft" / "code_alpaca" / "code_alpaca_2k.json"
    rows = json.loads(src.read_text(encoding="utf-8"))
    random.Random(seed).shuffle(rows)
    rows = [r for r in rows if str(r.get("output", "")).strip()]
    if n_heldout + n_train > len(rows):
        raise ValueError(f"{src} has {len(rows)} rows; {n_heldout} held out + {n_train} train do not fit")
    out = work / "data"
    out.mkdir(parents=True, exist_ok=True)
    heldout, train = out / f"code_alpaca_heldout{n_heldout}.json", out / f"code_alpaca_train{n_train}.json"
    heldout.write_text(json.dumps(rows[:n_heldout], indent=1))
    train.write_text(json.dumps(rows[n_heldout:n_heldout + n_train], indent=1))
    return train, heldout


def prepare_replay(shared: Path, work: Path, *, n: int, seed: int = 0) -> Path:
    """GSM8K train questions and worked answers as one-turn dialogues, written in the TG corpus layout.

    Calculator annotations ``<<48/2=24>>`` are removed and ``#### 72`` becomes "The answer is 72."
    """
    import pyarrow as pa

    from pipeline.corpus import DIALOGUE_SCHEMA, write_table

    out = work / CORPUS_OF["replay_gsm8k"]
    if (out / "dialogues").is_dir():
        return out
    src = shared / "eval" / "gsm8k" / "train.jsonl"
    items = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(items)
    rows = []
    for i, item in enumerate(items[:n]):
        answer = re.sub(r"<<[^>]*>>", "", item["answer"])
        answer = re.sub(r"\n?#### *(.+)$", r"\nThe answer is \1.", answer.strip())
        messages = [{"role": "user", "content": item["question"].strip()}, {"role": "assistant", "content": answer}]
        rows.append({"dialogue_id": f"gsm8k-{i:05d}", "messages": messages, "text": None, "node_ids": [],
                     "n_turns": 1, "n_tokens": 0, "tree": "gsm8k-train"})
    write_table(pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA), out / "dialogues", shard_rows=100_000)
    return out


def lima_dialogues(path: Path) -> list[dict]:
    """LIMA rows as ``{"dialogue_id": "lima-<line>", "messages"}``: strings alternate user and assistant, starting
    with the user; a trailing user string is dropped so every dialogue ends with an assistant turn. Rows with an
    empty string or no assistant turn are left out."""
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        turns = json.loads(line)["conversations"]
        turns = turns[: len(turns) // 2 * 2]
        if not turns or any(not isinstance(t, str) or not t.strip() for t in turns):
            continue
        messages = [{"role": ("user", "assistant")[i % 2], "content": t.strip()} for i, t in enumerate(turns)]
        rows.append({"dialogue_id": f"lima-{line_no:04d}", "messages": messages})
    return rows


def split_lima(rows: list[dict], *, n_heldout: int, seed: int = LIMA_SPLIT_SEED) -> tuple[list[dict], list[dict]]:
    """(held-out, replay): a seeded shuffle's first ``n_heldout`` rows and the rest, disjoint, both in file order."""
    if n_heldout >= len(rows):
        raise ValueError(f"LIMA has {len(rows)} usable rows; --lima-heldout {n_heldout} leaves none for replay")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_heldout])
    return [r for i, r in enumerate(rows) if i in held], [r for i, r in enumerate(rows) if i not in held]


def lima_corpus(args) -> Path:
    """The LIMA replay corpus folder; its name carries the held-out size, so another split never reuses it."""
    return args.work_dir / f"{CORPUS_OF['replay_lima']}_h{args.lima_heldout}"


def prepare_lima(args) -> Path:
    """LIMA's replay rows in the TG corpus layout (like :func:`prepare_replay`) and its held-out rows as a dialogue
    JSONL file for the NLL probe; returns the held-out file."""
    import pyarrow as pa

    from pipeline.corpus import DIALOGUE_SCHEMA, write_table

    heldout, replay = split_lima(lima_dialogues(args.lima_file), n_heldout=args.lima_heldout)
    path = args.work_dir / "data" / f"lima_heldout{args.lima_heldout}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in heldout), encoding="utf-8")
    out = lima_corpus(args)
    if not (out / "dialogues").is_dir():
        rows = [{**r, "text": None, "node_ids": [], "n_turns": len(r["messages"]) // 2, "n_tokens": 0,
                 "tree": "lima"} for r in replay]
        write_table(pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA), out / "dialogues", shard_rows=100_000)
    log(f"LIMA: {len(heldout)} held-out rows -> {path}, {len(replay)} replay rows in {out}")
    return path


# ----------------------------------------------------------------------------- arms and seeds


def arm_label(arm: str, seed: int) -> str:
    """Seed 0 (and ``base``, never re-seeded) keeps the arm's name; other seeds are ``<arm>@s<seed>``."""
    return arm if seed == 0 or arm == "base" else f"{arm}@s{seed}"


def parse_label(label: str) -> tuple[str, int]:
    """``(arm, seed)`` of a label from :func:`arm_label`."""
    arm, _, seed = label.partition("@s")
    return arm, int(seed or 0)


def run_name(label: str) -> str:
    """Folder, run name and served model id of a label (``[A-Za-z0-9_.-]``): ``domain@s1`` -> ``domain-s1``."""
    return label.replace("@s", "-s")


def arm_labels(arms: list[str], seeds: list[int]) -> list[str]:
    """Every arm once per seed, seed by seed; ``base`` only once."""
    labels = [arm_label(a, s) for s in seeds for a in arms]
    return list(dict.fromkeys(labels))


def seed_overrides(seed: int) -> list[str]:
    """Training and mix seeds of a re-seeded arm (none for seed 0, which keeps the config's own)."""
    return [] if seed == 0 else [f"train.seed={seed}", f"mix.seed={seed}"]


def equal_steps_overrides(manifest: dict) -> list[str]:
    """``train.max_steps`` = the steps of a TG arm's train ``manifest``, with enough epochs of the domain data
    alone to reach them: the TG arm's epochs scaled by 1 / (1 - its extra-token share), plus one."""
    steps = manifest.get("steps")
    if not steps:
        raise ValueError("the tg_balance train manifest has no step count")
    mix = manifest.get("mix") or {}
    share = mix.get("tg_share_tokens", mix.get("tg_share_examples")) or 0.0
    epochs = (manifest.get("train") or {}).get("epochs") or 1
    return [f"train.max_steps={steps}", f"train.epochs={math.ceil(epochs / (1 - share)) + 1}"]


def arm_dir(args, label: str) -> Path:
    return args.work_dir / "arms" / run_name(label)


def result_path(args, label: str) -> Path:
    """The arm's scoring under this run's eval tag (``arms/<arm>/result-<tag>.json``)."""
    return arm_dir(args, label) / f"result-{args.tag}.json"


def tg_balance_train(args, seed: int) -> dict | None:
    """The train manifest of ``tg_balance`` of this seed, or else the ``train`` block its kept scoring carries
    (``arms/<tg_balance>/result-<tag>.json``: a scoring copied in from committed results stands for a model that is
    gone); None when neither exists."""
    label = arm_label("tg_balance", seed)
    manifest, scoring = arm_dir(args, label) / "train" / "manifest.json", result_path(args, label)
    if manifest.is_file():
        return json.loads(manifest.read_text())
    if scoring.is_file():
        return json.loads(scoring.read_text()).get("train")
    return None


# ----------------------------------------------------------------------------- configs


def arm_config(args, label: str, *, train_file: Path, heldout_file: Path, port: int = 8000):
    from pipeline.config import load_config

    arm, seed = parse_label(label)
    overrides = [
        f"name={run_name(label)}", f"output_root={args.work_dir / 'arms'}",
        f"data.train={json.dumps([str(train_file)])}", f"data.eval={json.dumps([str(heldout_file)])}",
        f"eval.data_dir={args.eval_data_dir}", f"eval.tasks={json.dumps(args.tasks)}", f"serve.port={port}",
    ]
    if args.limit:
        overrides.append(f"eval.limit={args.limit}")
    if arm == "replay_lima":
        overrides.append(f"mix.tg_corpus={lima_corpus(args)}")
    elif arm in CORPUS_OF:
        overrides.append(f"mix.tg_corpus={args.work_dir / CORPUS_OF[arm]}")
    else:
        overrides.append("mix.tg_ratio=0")
    overrides += seed_overrides(seed) + list(args.set)
    if arm == "domain_lora":
        overrides.append(f"train.lora={json.dumps(LORA)}")
        if args.lora_lr is not None:
            overrides.append(f"train.lr={args.lora_lr}")
    if arm == "domain_equal_steps":
        trained, tg = tg_balance_train(args, seed), arm_label("tg_balance", seed)
        if trained is None:
            raise FileNotFoundError(f"{label}: needs the step count of {tg}, which has neither a train manifest nor "
                                    f"a kept scoring in {arm_dir(args, tg)} (train that arm first)")
        overrides += equal_steps_overrides(trained)
    return load_config(args.config, overrides=overrides)


def corpus_config(args, preset: str):
    from pipeline.config import load_config

    branching = PRESETS[preset](args.roots)
    return load_config(args.config, overrides=[f"name=corpus_{preset}", f"output_root={args.work_dir}",
                                               f"tree.preset={preset}", f"tree.branching={branching}"]
                       + list(args.gen_set))


# ----------------------------------------------------------------------------- stages per arm


def make_corpus(args, preset: str) -> Path:
    """Generate (or reuse) the TG corpus of one tree shape with ``pipeline.generate``."""
    from pipeline.generate import generate

    out, t0 = args.work_dir / f"corpus_{preset}", time.monotonic()
    generate(corpus_config(args, preset), out_dir=out, log=log)
    log(f"corpus_{preset}: ready ({time.monotonic() - t0:.0f} s)")
    return out


def run_train(args, label: str, files: tuple[Path, Path]) -> Path:
    from pipeline.model import resolve_model
    from pipeline.train import train

    if label == "base":
        cfg = arm_config(args, label, train_file=files[0], heldout_file=files[1])
        return Path(resolve_model(cfg.model, log=log))
    arm, seed = parse_label(label)
    if arm == "domain_equal_steps" and tg_balance_train(args, seed) is None:
        log(f"{label}: training {arm_label('tg_balance', seed)} first, for its step count")
        if "balance" in args.presets:
            make_corpus(args, "balance")
        run_train(args, arm_label("tg_balance", seed), files)
    cfg = arm_config(args, label, train_file=files[0], heldout_file=files[1])
    t0 = time.monotonic()
    model = train(cfg, corpus_dir=Path(cfg.mix.tg_corpus) if cfg.mix.tg_corpus else None, log=log)
    log(f"{label}: model {model} ({time.monotonic() - t0:.0f} s)")
    return model


def _stored_result(args, label: str) -> dict | None:
    """The arm's result of an earlier scoring with the same eval settings, if any (and not ``--force-eval``)."""
    out = result_path(args, label)
    if not out.is_file() or args.force_eval:
        return None
    stored = json.loads(out.read_text())
    ev = stored.get("eval_config", {})
    if args.lima_file and "lima_heldout_nll" not in stored:
        log(f"{label}: {out} has no lima_heldout_nll; scoring again")
        return None
    if ev.get("limit") == args.limit and ev.get("tasks") == args.tasks and ev.get("data_dir") == str(args.eval_data_dir):
        log(f"{label}: reusing {out}")
        return stored
    log(f"{label}: {out} was scored with other eval settings; scoring again")
    return None


def probe_dialogues(args, cfg) -> dict[str, list[dict]]:
    """The held-out TG dialogues of each retention probe whose corpus exists, by result key: ``retention`` (the
    Balance-Tree corpus, scored inside ``evaluate``) and ``retention_wide`` (the Wide-Tree corpus)."""
    from pipeline.evaluate import _heldout_dialogues

    out = {}
    for key, preset in (("retention", "balance"), ("retention_wide", "wide")):
        corpus = args.work_dir / f"corpus_{preset}"
        if cfg.eval.retention_dialogues and (corpus / "dialogues").is_dir():
            out[key] = _heldout_dialogues(corpus, cfg.eval.retention_dialogues)
    return out


def probe_digest(dialogues: list[dict]) -> str:
    """sha256 of a probe's dialogues (ids and texts): a corpus made anew can reuse node ids with other texts."""
    return hashlib.sha256(json.dumps(dialogues, sort_keys=True, default=str).encode()).hexdigest()


def stale_probes(result: dict, probes: dict[str, list[dict]]) -> list[str]:
    """The retention probes of a kept result that are missing or were scored on other dialogues than ``probes``
    holds now (its corpus was made anew): only these need scoring again. A probe scored before digests were kept
    is compared by its dialogue ids."""
    stale = []
    for key, dialogues in probes.items():
        kept = result.get(key) or {}
        if "dialogues_sha256" in kept:
            fresh = kept["dialogues_sha256"] == probe_digest(dialogues)
        else:
            fresh = bool(kept) and set(kept["items"]["ids"]) == {d["dialogue_id"] for d in dialogues}
        if not fresh:
            stale.append(key)
    return stale


def _probe(cfg, label: str, model: Path, url: str, dialogues: list[dict]) -> dict:
    from pipeline.evaluate import retention_probe

    return retention_probe(base_url=url, model_id=run_name(label), tokenizer=str(model), dialogues=dialogues,
                           max_len=cfg.model.max_model_len, num_concurrent=cfg.eval.num_concurrent)


def _retention_probe(cfg, label: str, model: Path, url: str, dialogues: list[dict]) -> dict:
    """:func:`_probe` on a retention probe's dialogues, with their digest (see :func:`stale_probes`)."""
    return _probe(cfg, label, model, url, dialogues) | {"dialogues_sha256": probe_digest(dialogues)}


def _write_result(args, label: str, result: dict) -> Path:
    """Write an arm's scoring atomically: a crash mid-write must not lose a kept scoring that is being updated."""
    from pipeline.corpus import atomic_write_text

    out = result_path(args, label)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return out


def _score(args, label: str, model: Path, files: tuple[Path, Path], url: str) -> dict:
    """``pipeline.evaluate`` plus the domain NLL, the LIMA held-out NLL and the Wide-Tree retention probe of one
    served arm (served as :func:`run_name` of its label)."""
    from pipeline.data import load_examples
    from pipeline.evaluate import evaluate
    from pipeline.probes import load_reference_text

    arm = run_name(label)
    cfg = arm_config(args, label, train_file=files[0], heldout_file=files[1])
    domain_rows = [{"dialogue_id": f"heldout-{i:04d}", "messages": m}
                   for i, m in enumerate(load_examples([files[1]], fmt="auto").examples)]
    t0 = time.monotonic()
    result = evaluate(cfg, models={arm: str(model)}, base_url=url, out_dir=cfg.run_dir / f"eval-{args.tag}",
                      corpus_dir=args.work_dir / "corpus_balance")[arm]
    result["domain_nll"] = _probe(cfg, label, model, url, domain_rows)
    if args.lima_heldout_file:
        result["lima_heldout_nll"] = _probe(cfg, label, model, url, load_reference_text(args.lima_heldout_file))
    probes = probe_dialogues(args, cfg)
    if "retention" in result and "retention" in probes:
        result["retention"]["dialogues_sha256"] = probe_digest(probes["retention"])
    if "retention_wide" in probes:
        result["retention_wide"] = _retention_probe(cfg, label, model, url, probes["retention_wide"])
    result["eval_seconds_total"] = round(time.monotonic() - t0, 1)
    manifest = cfg.run_dir / "train" / "manifest.json"
    if label != "base" and manifest.is_file():
        m = json.loads(manifest.read_text())
        result["train"] = {k: m.get(k) for k in ("steps", "tokens", "tokens_per_s", "initial_loss", "final_loss",
                                                 "train_seconds", "mix", "tokenization", "train")}
    add_kl(args, label, model, result, files)
    out = _write_result(args, label, result)
    log(f"{label}: eval done in {result['eval_seconds_total']:.0f} s -> {out}")
    return result


def rescore_probes(args, label: str, model: Path, files: tuple[Path, Path], url: str, result: dict) -> dict:
    """Score a kept result's stale retention probes again (:func:`stale_probes`) and keep everything else."""
    cfg = arm_config(args, label, train_file=files[0], heldout_file=files[1])
    probes = probe_dialogues(args, cfg)
    for key in stale_probes(result, probes):
        result[key] = _retention_probe(cfg, label, model, url, probes[key])
        log(f"{label}: {key} scored again on the current corpus's {len(probes[key])} held-out dialogues "
            f"(NLL {result[key]['metrics']['nll']['value']:.3f}); the rest of the kept result is unchanged")
    _write_result(args, label, result)
    return result


def add_kl(args, label: str, model: Path, result: dict, files: tuple[Path, Path]) -> bool:
    """Add ``kl`` (KL(base || arm) per token on the config's ``eval.kl_prompts`` generic dialogues, exact, on this
    CPU: ``pipeline.probes.drift_probes``) to a trained arm's result; False when there is nothing to add (base, no
    prompts, already there, no model)."""
    from pipeline.model import resolve_model
    from pipeline.probes import drift_probes, generic_rows

    cfg = arm_config(args, label, train_file=files[0], heldout_file=files[1])
    if label == "base" or not cfg.eval.kl_prompts or "kl" in result or not (model / "config.json").is_file():
        return False
    arm = run_name(label)
    probes = drift_probes({"base": resolve_model(cfg.model, log=log), arm: str(model)}, reference_id="base",
                          kl_rows=generic_rows(cfg.eval.kl_prompts), text_rows=[], max_len=cfg.model.max_model_len,
                          trust_remote_code=cfg.model.trust_remote_code, log=log)
    result["kl"] = probes[arm]["kl"]
    log(f"{label}: KL to base {result['kl']['value']:.4f} on {result['kl']['n']} generic dialogues")
    return True


def run_evals(args, models: dict[str, Path], files: tuple[Path, Path], done) -> dict[str, dict]:
    """Score every arm's model: stored results are reused (only their stale retention probes scored again), the
    rest are served ``--serve-group`` at a time on one Ray Serve app (one start-up per group) and scored one after
    another. ``done(results)`` is called after every arm, so a crash keeps what was scored."""
    from pipeline.serve import free_port, serving

    results: dict[str, dict] = {}
    todo = {}
    for arm, model in models.items():
        stored = _stored_result(args, arm)
        if stored is None:
            todo[arm] = model
            continue
        if add_kl(args, arm, model, stored, files):  # scorings kept from before the KL probe was added
            _write_result(args, arm, stored)
        results[arm] = stored
        cfg = arm_config(args, arm, train_file=files[0], heldout_file=files[1])
        if stale_probes(stored, probe_dialogues(args, cfg)):
            todo[arm] = model  # served for its retention probes only
    names = list(todo)
    for i in range(0, len(names), args.serve_group):
        labels = names[i:i + args.serve_group]
        group = {run_name(label): str(todo[label]) for label in labels}
        cfg = arm_config(args, names[i], train_file=files[0], heldout_file=files[1], port=free_port())
        t0 = time.monotonic()
        with serving(cfg, group) as url:
            log(f"{', '.join(labels)}: serving at {url} ({time.monotonic() - t0:.0f} s)")
            for label in labels:
                try:
                    if label in results:
                        results[label] = rescore_probes(args, label, todo[label], files, url, results[label])
                    else:
                        results[label] = _score(args, label, todo[label], files, url)
                except Exception as e:  # one arm's failed eval must not lose the others
                    log(f"{label}: eval FAILED: {type(e).__name__}: {e}")
                    continue
                done(results)
    return results


# ----------------------------------------------------------------------------- summary


def _m(value: float | None, se: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f} ± {se:.{digits}f}" if se is not None else f"{value:.{digits}f}"


def _task_items(result: dict, task: str, metric: str) -> tuple[list, list] | None:
    items = result.get("tasks", {}).get(task, {}).get("items") or {}
    return (items["ids"], items[metric]) if metric in items and "ids" in items else None


def paired_vs(results: dict[str, dict], label: str, ref: str, *, tasks: list[str]) -> dict:
    """``label`` minus ``ref`` on the same items: per task and metric (acc, acc_norm) the mean difference with its
    paired standard error and 95 % paired bootstrap interval (:func:`pipeline.stats.paired_diff`), and per metric
    the mean of the differences over the tasks that report it (winogrande has no acc_norm), whose interval resamples
    every task's items in each bootstrap draw. ``primary``: the same mean over tasks of each task's pre-registered
    primary metric (PRIMARY_METRIC), the study's primary endpoint."""
    from pipeline.stats import align, paired_diff

    out: dict = {"reference": ref, "tasks": {}, "mean": {}}
    diffs: dict[tuple[str, str], object] = {}
    for metric in PAIRED_METRICS:
        for task in tasks:
            a, b = _task_items(results[ref], task, metric), _task_items(results[label], task, metric)
            if not a or not b:
                continue
            _, x, y = align(a[0], a[1], b[0], b[1])
            if not x.size:
                continue
            out["tasks"].setdefault(task, {})[metric] = paired_diff(x, y, iters=BOOTSTRAP_ITERS, seed=0)
            diffs[task, metric] = y - x
        if mean := _mean_over_tasks({t: d for (t, m), d in diffs.items() if m == metric}):
            out["mean"][metric] = mean
    primary = {t: diffs[t, m] for t in tasks if (m := PRIMARY_METRIC.get(t, "acc")) and (t, m) in diffs}
    if mean := _mean_over_tasks(primary):
        out["primary"] = {**mean, "metrics": {t: PRIMARY_METRIC.get(t, "acc") for t in primary}}
    return out


def _mean_over_tasks(diffs: dict) -> dict | None:
    """The mean over tasks of per-item paired differences (task -> array), with a 95 % bootstrap interval that
    resamples every task's items in each draw."""
    import numpy as np

    if not diffs:
        return None
    rng = np.random.default_rng(0)
    boot = np.mean([d[rng.integers(0, d.size, size=(BOOTSTRAP_ITERS, d.size))].mean(axis=1)
                    for d in diffs.values()], axis=0)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"delta": float(np.mean([d.mean() for d in diffs.values()])), "ci95": [float(lo), float(hi)],
            "tasks": list(diffs), "n": int(sum(d.size for d in diffs.values()))}


def seed_spread(arms: dict[str, dict]) -> dict[str, dict]:
    """Per arm trained with more than one seed: min / max / mean over its seeds of the mean accuracy and the NLLs."""
    by_arm: dict[str, list[str]] = {}
    for label in arms:
        by_arm.setdefault(parse_label(label)[0], []).append(label)
    out = {}
    for arm, labels in by_arm.items():
        if len(labels) < 2:
            continue
        row: dict = {"seeds": [parse_label(lb)[1] for lb in labels]}
        for key in ("mean_acc", "domain_nll", "lima_heldout_nll"):
            vals = [arms[lb][key]["value"] for lb in labels if arms[lb].get(key)]
            if len(vals) == len(labels):
                row[key] = {"min": min(vals), "max": max(vals), "mean": sum(vals) / len(vals)}
        out[arm] = row
    return out


def summarize(results: dict[str, dict], *, tasks: list[str]) -> dict:
    """Per arm: acc ± stderr per task, the task mean, domain metrics and probes; deltas against base and domain
    (independent-sample bound) and paired differences on the same items (``paired_vs_base``, ``paired_vs_domain``:
    the same-seed domain arm when it was scored)."""
    arms = {}
    for arm, r in results.items():
        row: dict = {"tasks": {}}
        for task in tasks:
            met = r.get("tasks", {}).get(task, {}).get("metrics", {}).get("acc")
            if met:
                row["tasks"][task] = {"value": met["value"], "stderr": met["stderr"],
                                      "n": r["tasks"][task].get("n")}
        if len(row["tasks"]) == len(tasks):
            vals = [row["tasks"][t]["value"] for t in tasks]
            ses = [row["tasks"][t]["stderr"] or 0.0 for t in tasks]
            row["mean_acc"] = {"value": sum(vals) / len(vals), "stderr": math.sqrt(sum(s * s for s in ses)) / len(ses)}
        if "domain_nll" in r:
            row["domain_nll"] = r["domain_nll"]["metrics"]["nll"]
        if "domain" in r:
            row["domain_token_f1"] = r["domain"]["metrics"].get("token_f1")
            row["domain_items"] = r["domain"].get("n")
        if "retention" in r:
            row["retention_nll_balance"] = r["retention"]["metrics"]["nll"]
        if "retention_wide" in r:
            row["retention_nll_wide"] = r["retention_wide"]["metrics"]["nll"]
        if "lima_heldout_nll" in r:
            row["lima_heldout_nll"] = r["lima_heldout_nll"]["metrics"]["nll"]
        if "train" in r:
            t = r["train"]
            row["train"] = {"steps": t.get("steps"), "tokens": t.get("tokens"), "final_loss": t.get("final_loss"),
                            "train_seconds": t.get("train_seconds"), "tokens_per_s": t.get("tokens_per_s"),
                            "domain_examples": (t.get("mix") or {}).get("domain_examples"),
                            "extra_examples": (t.get("mix") or {}).get("tg_examples"),
                            "extra_token_share": (t.get("mix") or {}).get("tg_share_tokens")}
        arms[arm] = row
    for ref in ("base", "domain"):
        if "mean_acc" not in arms.get(ref, {}):
            continue
        b = arms[ref]["mean_acc"]
        for arm, row in arms.items():
            if arm != ref and "mean_acc" in row:
                row[f"mean_acc_delta_vs_{ref}"] = {
                    "value": row["mean_acc"]["value"] - b["value"],
                    "stderr": math.hypot(row["mean_acc"]["stderr"], b["stderr"])}  # independent-sample bound
    for label in arms:
        seed = parse_label(label)[1]
        for key, ref in (("base", "base"), ("domain", arm_label("domain", seed))):
            ref = ref if ref in results else key
            if ref in results and ref != label and label != key:
                arms[label][f"paired_vs_{key}"] = paired_vs(results, label, ref, tasks=tasks)
    return arms


def _ci(d: dict | None) -> str:
    if not d:
        return "–"
    return f"{d['delta']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def _study_lines(arms: dict[str, dict], order: list[str], spread: dict[str, dict]) -> list[str]:
    """Markdown: paired mean-over-tasks differences against base and domain, and the seed spread."""
    cols = ("primary",) + PAIRED_METRICS
    lines = ["", "Paired differences on the same items, mean over tasks (95 % paired bootstrap CI; primary: each "
             "task's pre-registered metric):", "",
             "| arm | " + " | ".join(f"{m} vs {ref}" for ref in ("base", "domain") for m in cols) + " |",
             "|---|" + "---|" * 2 * len(cols)]
    for a in order:
        cells = [_ci(p.get("primary") if m == "primary" else p.get("mean", {}).get(m))
                 for ref in ("base", "domain") for m in cols for p in [arms[a].get(f"paired_vs_{ref}", {})]]
        if any(c != "–" for c in cells):
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    if spread:
        lines += ["", "Seed spread (min / max / mean over seeds):", "",
                  "| arm | seeds | mean acc | domain NLL | LIMA held-out NLL |", "|---|---|---|---|---|"]
        for arm, row in spread.items():
            cells = [" / ".join(f"{row[k][s]:.3f}" for s in ("min", "max", "mean")) if k in row else "–"
                     for k in ("mean_acc", "domain_nll", "lima_heldout_nll")]
            lines.append(f"| {arm} | {row['seeds']} | " + " | ".join(cells) + " |")
    return lines


def write_outputs(args, results: dict[str, dict], setup: dict) -> None:
    from common import RESULTS, machine

    RESULTS = args.results_dir or RESULTS
    tasks = args.tasks
    arms = summarize(results, tasks=tasks)
    spread = seed_spread(arms)
    missing = [a for a in args.labels if a not in results]
    status = "complete" if not missing else f"partial (missing arms: {', '.join(missing)})"
    name = args.name
    data = {"status": status, "setup": setup, "arms": arms, "seed_spread": spread, "machine": machine(),
            "eval_data_dir": str(args.eval_data_dir), "tag": args.tag}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")

    order = [a for a in args.labels if a in arms]
    short = {t: t.removeprefix("tgsft_") for t in tasks}
    lines = [f"# Forgetting experiment ({status})", "",
             f"Eval data: `{args.eval_data_dir}` (tag `{args.tag}`), {args.limit or 'all'} items per task, 0-shot acc "
             "± stderr. Domain NLL / retention NLL: mean NLL per assistant token (lower is better) ± stderr over "
             "dialogues.", "",
             "| task | " + " | ".join(order) + " |", "|---|" + "---|" * len(order)]
    for t in tasks:
        lines.append(f"| {short[t]} | " + " | ".join(_m(*_vs(arms[a]["tasks"].get(t))) for a in order) + " |")
    n_domain = next((arms[a]["domain_items"] for a in order if arms[a].get("domain_items")), "?")
    n_nll = args.domain_heldout
    for key, label in [("mean_acc", "**mean acc (5 tasks)**"), ("mean_acc_delta_vs_base", "Δ mean vs base"),
                       ("mean_acc_delta_vs_domain", "Δ mean vs domain-only"),
                       ("domain_nll", f"domain NLL ({n_nll} held-out Code Alpaca)"),
                       ("domain_token_f1", f"domain token F1 (greedy, {n_domain} items)"),
                       ("retention_nll_balance", "retention NLL (balance-tree held-out)"),
                       ("retention_nll_wide", "retention NLL (wide-tree held-out)"),
                       ("lima_heldout_nll", f"LIMA held-out NLL ({args.lima_heldout} dialogues)")]:
        lines.append(f"| {label} | " + " | ".join(_m(*_vs(arms[a].get(key))) for a in order) + " |")
    lines += ["", "| arm | steps | tokens | final loss | train s | domain ex. | extra ex. | extra token share |",
              "|---|---|---|---|---|---|---|---|"]
    for a in order:
        t = arms[a].get("train")
        if t:
            lines.append(f"| {a} | {t['steps']} | {t['tokens']} | {(t['final_loss'] or 0):.3f} | "
                         f"{(t['train_seconds'] or 0):.0f} | {t['domain_examples']} | {t['extra_examples']} | "
                         f"{(t['extra_token_share'] or 0):.2f} |")
    lines += _study_lines(arms, order, spread)
    lines += ["", "Setup: `" + json.dumps(setup) + "`", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    _plot(arms, order, tasks, short, RESULTS / f"{name}.png", title=f"Forgetting experiment ({status})")
    log(f"wrote {RESULTS / name}.{{json,md,png}} ({status})")


def _vs(m: dict | None) -> tuple:
    return (None, None) if not m else (m["value"], m.get("stderr"))


def _plot(arms: dict, order: list[str], tasks: list[str], short: dict, path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1.4]})
    cols = tasks + ["mean_acc"]
    width = 0.8 / max(1, len(order))
    for i, a in enumerate(order):
        vals = [_vs(arms[a]["tasks"].get(t) if t != "mean_acc" else arms[a].get("mean_acc")) for t in cols]
        xs = [j + i * width for j in range(len(cols))]
        ax1.bar(xs, [v or 0 for v, _ in vals], width, yerr=[s or 0 for _, s in vals], capsize=2, label=a)
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], [short.get(c, "mean") for c in cols])
    ax1.set_ylabel("0-shot accuracy (± stderr)")
    ax1.legend(fontsize=8)
    ax1.set_title("general tasks")
    keys = [("domain_nll", "domain NLL"), ("retention_nll_balance", "ret. NLL bal."),
            ("retention_nll_wide", "ret. NLL wide"), ("lima_heldout_nll", "LIMA NLL")]
    for i, a in enumerate(order):
        vals = [_vs(arms[a].get(k)) for k, _ in keys]
        xs = [j + i * width for j in range(len(keys))]
        ax2.bar(xs, [v or 0 for v, _ in vals], width, yerr=[s or 0 for _, s in vals], capsize=2, label=a)
    ax2.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [label for _, label in keys])
    ax2.set_ylabel("NLL per token (lower is better)")
    ax2.set_title("domain and retention")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data",
                   help="folder with sft/code_alpaca and eval/gsm8k (default ../shared/data beside the repo)")
    p.add_argument("--eval-data-dir", type=Path, default=None,
                   help="upstream-format eval files for the mirrors (default <shared-data>/eval)")
    p.add_argument("--tag", default=None, help="names this scoring (result-<tag>.json); default 'dev' or the dir name")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/tgsft-forgetting"))
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--arms", nargs="+", default=None, choices=ARMS,
                   help="arms to run (default: all; replay_lima is skipped when the LIMA file is absent)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="training seeds (train.seed and mix.seed): seed 0 keeps the arm names, others are "
                   "<arm>@s<seed> in arms/<arm>-s<seed>/; base is never re-seeded")
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--limit", type=int, default=None, help="items per task (default: the config's eval.limit)")
    p.add_argument("--domain-train", type=int, default=120, help="Code Alpaca training examples")
    p.add_argument("--domain-heldout", type=int, default=200, help="held-out Code Alpaca examples (domain metrics)")
    p.add_argument("--replay-rows", type=int, default=400, help="GSM8K dialogues in the replay corpus")
    p.add_argument("--lima-heldout", type=int, default=100,
                   help="LIMA dialogues held out (seeded choice, never replayed) for every arm's lima_heldout_nll")
    p.add_argument("--lora-lr", type=float, default=None,
                   help="learning rate of domain_lora (default: train.lr, the same as every other arm)")
    p.add_argument("--roots", type=int, default=48,
                   help="first-layer width r: balance [r,1,2,1], wide [1.5r,1,1,1] (the same node budget)")
    p.add_argument("--set", action="append", default=[], help="config override for every arm, key.path=value")
    p.add_argument("--gen-set", action="append", default=[], help="config override for corpus generation")
    p.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS),
                   help="TG corpora to generate (they also feed the retention probes); TG arms need theirs")
    p.add_argument("--eval-only", action="store_true", help="score existing arms' models; never train or generate")
    p.add_argument("--train-only", action="store_true", help="generate and train, do not evaluate")
    p.add_argument("--summary-only", action="store_true",
                   help="rewrite the summary from the stored result-<tag>.json files (no Ray, nothing run)")
    p.add_argument("--force-eval", action="store_true", help="re-score even when result-<tag>.json exists")
    p.add_argument("--serve-group", type=int, default=4,
                   help="arms served together on one Serve app while scoring (each holds its model and KV cache)")
    p.add_argument("--results-dir", type=Path, default=None, help="summary folder (default benchmarks/results)")
    p.add_argument("--name", default=None, help="result file stem (default forgetting, or forgetting_<tag>)")
    args = p.parse_args(argv)
    args.shared_data = args.shared_data.resolve()
    args.eval_data_dir = (args.eval_data_dir or args.shared_data / "eval").resolve()
    default_eval = args.eval_data_dir == (args.shared_data / "eval").resolve()
    args.tag = args.tag or ("dev" if default_eval else args.eval_data_dir.name)
    args.name = args.name or ("forgetting" if args.tag == "dev" else f"forgetting_{args.tag}")
    args.work_dir = args.work_dir.resolve()
    _resolve_lima(args)
    args.labels = arm_labels(args.arms, args.seeds)
    if args.limit is None:
        from pipeline.config import load_config

        args.limit = load_config(args.config).eval.limit
    return args


def _resolve_lima(args: argparse.Namespace) -> None:
    """Set ``args.arms`` and ``args.lima_file`` (None when the LIMA file is absent: the arm and its metric are skipped).

    Raises:
        SystemExit: replay_lima was asked for in ``--arms`` and the file is absent.
    """
    explicit = args.arms is not None
    args.arms = list(args.arms or ARMS)
    path = args.shared_data / LIMA_FILE
    args.lima_file = path if path.is_file() else None
    args.lima_heldout_file = None
    if args.lima_file:
        return
    if explicit and "replay_lima" in args.arms:
        raise SystemExit(f"replay_lima: the LIMA file {path} does not exist")
    skipped = "arm replay_lima and metric lima_heldout_nll" if "replay_lima" in args.arms else "lima_heldout_nll"
    args.arms = [a for a in args.arms if a != "replay_lima"]
    log(f"LIMA: {path} not found; {skipped} skipped")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.runtime import init_ray

    t0 = time.monotonic()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    files = prepare_domain(args.shared_data, args.work_dir, n_train=args.domain_train, n_heldout=args.domain_heldout)
    if args.lima_file:
        args.lima_heldout_file = prepare_lima(args)
    setup = {"domain_train": args.domain_train, "domain_heldout": args.domain_heldout, "roots": args.roots,
             "replay_rows": args.replay_rows, "limit": args.limit, "tasks": args.tasks, "overrides": args.set,
             "seeds": args.seeds, "lima_heldout": args.lima_heldout if args.lima_file else None,
             "lora": LORA, "lora_lr": args.lora_lr,
             "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
             "train": arm_config(args, "domain", train_file=files[0], heldout_file=files[1]).train.model_dump(
                 mode="json")}
    if args.summary_only:
        stored = {label: result_path(args, label) for label in args.labels}
        write_outputs(args, {a: json.loads(p.read_text()) for a, p in stored.items() if p.is_file()}, setup)
        return 0
    init_ray()  # one local Ray for every stage, so serving() does not stop it between arms
    if not args.eval_only:
        # The balance corpus also feeds the retention probe of every arm, so it comes first; the wide corpus is
        # made just before its arm (on a busy machine the cheaper arms finish first).
        if "balance" in args.presets:
            make_corpus(args, "balance")
        if "replay_gsm8k" in args.arms:
            prepare_replay(args.shared_data, args.work_dir, n=args.replay_rows)

    models: dict[str, Path] = {}
    for label in args.labels:
        model = arm_dir(args, label) / "train" / "model"
        if label == "base" or not args.eval_only:
            if parse_label(label)[0] == "tg_wide" and "wide" in args.presets:
                make_corpus(args, "wide")
            model = run_train(args, label, files)
        elif not (model / "config.json").is_file():
            log(f"{label}: no trained model at {model}; skipped (--eval-only)")
            continue
        models[label] = model
    if not args.train_only:
        # after every arm, so a partial run still leaves a summary
        results = run_evals(args, models, files, done=lambda r: write_outputs(args, r, setup))
        write_outputs(args, results, setup)
    log(f"done in {(time.monotonic() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
