"""The built-in domain (structured extraction into fixed-format JSON) and domain-task scoring.

    build_domain(Path("runs/x/domain"))   # -> train.jsonl, eval.jsonl in chat ``messages`` format

Each example asks for the person, city and year of one sentence as JSON, e.g. "In 1998, Maria moved to Lyon." ->
``{"person": "Maria", "city": "Lyon", "year": 1998}``. The base 135M model rarely answers in exactly that format,
and ~200 examples teach it. Eval sentences use names, cities and sentence templates that never occur in training,
so the score measures the skill, not memorised strings. Everything derives from ``seed``.

Scoring (``score_items``) works for any chat eval set: the reference is the last assistant message;
``exact_match`` compares after whitespace normalisation, ``token_f1`` is SQuAD-style word F1, and when every
reference is a JSON object ``json_exact`` (parsed-JSON equality) and ``field_acc`` (share of reference fields
reproduced) are added. Writes: ``train.jsonl`` and ``eval.jsonl`` under ``out_dir``.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.corpus import atomic_write_text
from pipeline.stats import mean_stderr

__all__ = ["INSTRUCTION", "build_domain", "parse_json_object", "score_item", "score_items", "split_reference",
           "token_f1"]

INSTRUCTION = (
    'Extract the person, city and year from the sentence. Answer with JSON only, with the keys "person", '
    '"city" and "year".\nSentence: '
)

_TRAIN_NAMES = """Maria Ahmed Chen Olga Pedro Fatima Lucas Ingrid Kenji Amara Tomas Leila Viktor Sofia Rahul Elena
Jonas Mei Diego Hannah Omar Clara Felix Nadia Mateo Yuki Samuel Irene Arjun Greta Hugo Zara Emil Rosa Idris Lena
Pablo Anya Karim Nora""".split()
_EVAL_NAMES = """Beatriz Tariq Ilse Hiroshi Marisol Anselm Keziah Dmitri Ottilie Rafferty Sunniva Bartholomew
Ximena Leopold Wilhelmina Cosimo Thandiwe Evander Philippa Casimir""".split()
_TRAIN_CITIES = """Lyon Porto Kyoto Nairobi Oslo Lima Krakow Seville Hanoi Quito Dublin Tunis Bergen Perth Bogota
Leeds Zagreb Osaka Genoa Accra Riga Cusco Ghent Turin Malmo Basel Cork Split Bilbao Gdansk Sapporo Tartu Nantes Graz
Fez Leipzig Utrecht Aarhus Bremen Valencia""".split()
_EVAL_CITIES = """Trondheim Arequipa Ljubljana Salzburg Montevideo Tbilisi Heidelberg Cartagena Innsbruck Yerevan
Brisbane Marrakesh Winnipeg Kaunas Coimbra Dubrovnik Tallinn Antwerp Lausanne Bordeaux""".split()
_TRAIN_TEMPLATES = [
    "In {year}, {person} moved to {city}.",
    "{person} was born in {city} in {year}.",
    "{person} opened a bakery in {city} in {year}.",
    "The year was {year} when {person} first visited {city}.",
    "{person} graduated from a university in {city} in {year}.",
    "In {year} {person} left home and settled in {city}.",
    "{city} became home to {person} in {year}.",
    "{person} married in {city} in the summer of {year}.",
    "After {year}, {person} worked as a teacher in {city}.",
    "{person} painted the harbour of {city} in {year}.",
]
_EVAL_TEMPLATES = [
    "Back in {year}, {person} bought a small flat in {city}.",
    "It was in {city} that {person} wrote a first novel, in {year}.",
    "{person} arrived by train in {city} during {year}.",
    "According to the records, {person} ran a shop in {city} from {year}.",
]


def _examples(names: list[str], cities: list[str], templates: list[str], n: int, rng: random.Random) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < n:
        person, city, tpl = rng.choice(names), rng.choice(cities), rng.choice(templates)
        year = rng.randint(1900, 2023)
        sentence = tpl.format(person=person, city=city, year=year)
        if sentence in seen:
            continue
        seen.add(sentence)
        answer = json.dumps({"person": person, "city": city, "year": year})
        rows.append({"messages": [{"role": "user", "content": INSTRUCTION + sentence},
                                  {"role": "assistant", "content": answer}]})
    return rows


def build_domain(out_dir: Path, *, n_train: int = 240, n_eval: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """Write the built-in extraction domain: ``train.jsonl`` and ``eval.jsonl`` in chat messages format.

    Args:
        out_dir: output folder (created).
        n_train: training examples.
        n_eval: held-out examples (names, cities and templates disjoint from training).
        seed: the same seed gives byte-identical files.

    Returns:
        (train path, eval path).
    """
    rng = random.Random(seed)
    train = _examples(_TRAIN_NAMES, _TRAIN_CITIES, _TRAIN_TEMPLATES, n_train, rng)
    held = _examples(_EVAL_NAMES, _EVAL_CITIES, _EVAL_TEMPLATES, n_eval, rng)
    out_dir = Path(out_dir)
    paths = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    for path, rows in zip(paths, (train, held)):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return paths


def split_reference(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """(prompt, reference) of one eval dialogue: the reference is the last assistant message, the prompt every
    message before it.

    Raises:
        ValueError: the dialogue has no assistant message.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError(f"domain eval dialogue has no assistant message to score against: {messages!r:.200}")
    return messages[:last], messages[last]["content"]


# ----------------------------------------------------------------------------- scoring


def parse_json_object(text: str) -> dict | None:
    """The first JSON object in ``text`` (models often wrap it in prose or code fences), or None."""
    for match in re.finditer(r"\{", text):
        end = text.find("}", match.start())
        while end != -1:
            try:
                value = json.loads(text[match.start() : end + 1])
                return value if isinstance(value, dict) else None
            except json.JSONDecodeError:
                end = text.find("}", end + 1)
    return None


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over lower-cased whitespace tokens."""
    pred, ref = prediction.lower().split(), reference.lower().split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def score_item(prediction: str, reference: str) -> dict[str, float]:
    """Per-item domain metrics (see the module docstring); JSON metrics only when the reference is a JSON object."""
    scores = {
        "exact_match": float(" ".join(prediction.split()) == " ".join(reference.split())),
        "token_f1": token_f1(prediction, reference),
    }
    ref = parse_json_object(reference)
    if ref:
        pred = parse_json_object(prediction) or {}
        scores["json_exact"] = float(pred == ref)
        scores["field_acc"] = sum(pred.get(k) == v for k, v in ref.items()) / len(ref)
    return scores


def score_items(predictions: list[str], references: list[str]) -> dict[str, dict[str, Any]]:
    """Mean and standard error (sample std / sqrt(n), as lm-eval) of every metric over the items.

    Returns:
        ``{metric: {"value": mean, "stderr": se, "higher_is_better": True}}``; JSON metrics only when every
        reference is a JSON object.
    """
    per_item = [score_item(p, r) for p, r in zip(predictions, references, strict=True)]
    names = set.intersection(*(set(s) for s in per_item)) if per_item else set()
    out = {}
    for name in sorted(names):
        mean, se = mean_stderr([s[name] for s in per_item])
        out[name] = {"value": mean, "stderr": se, "higher_is_better": True}
    return out
