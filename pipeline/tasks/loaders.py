"""Dataset loaders for the offline task mirrors and ``tgsft_general``.

lm-eval calls these as ``custom_dataset`` (``!function loaders.<name>`` in the task YAMLs next to this file) with
the task metadata as keyword arguments; ``data_dir`` comes from the TaskManager metadata (``eval.data_dir``).
lm-eval imports this file by path, so it imports nothing from ``pipeline``.

Each loader reads the ORIGINAL upstream file format and converts rows to the Hugging Face dataset schema the
standard lm-eval task expects, so the mirror YAMLs can use the standard prompts unchanged.

File discovery: for a task, the first existing file among its candidates under ``<data_dir>/<folder>/`` is used,
dev/validation before test (``FILES``). A labels file ``<stem>-labels.lst`` beside the data file supplies labels
(PIQA needs it; WinoGrande uses it when present, else the rows' own ``answer`` field). Every split is exposed as
``test``; GSM8K also has ``train`` (``train.jsonl`` if present, else the test file) for few-shot examples.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["FILES", "GENERAL_ITEMS", "arc_row", "find_file", "piqa_row", "read_rows", "truthfulqa_row",
           "winogrande_row"]

log = logging.getLogger(__name__)

# task -> (folder under data_dir, candidate file names in preference order)
FILES: dict[str, tuple[str, list[str]]] = {
    "arc_easy": ("arc", ["ARC-Easy-Dev.jsonl", "ARC-Easy-Test.jsonl"]),
    "arc_challenge": ("arc", ["ARC-Challenge-Dev.jsonl", "ARC-Challenge-Test.jsonl"]),
    "piqa": ("piqa", ["valid.jsonl", "tests.jsonl", "test.jsonl"]),
    "sciq": ("sciq", ["valid.json", "test.json"]),
    "winogrande": ("winogrande", ["dev.jsonl", "test.jsonl"]),
    "gsm8k": ("gsm8k", ["test.jsonl"]),
    "truthfulqa": ("truthfulqa", ["mc_task.json", "data/mc_task.json"]),
}


def find_file(task: str, data_dir: str | Path | None) -> Path:
    """The upstream file of ``task`` under ``data_dir`` (see the module docstring for the rule).

    Raises:
        FileNotFoundError: ``data_dir`` unset or no candidate exists; names the task and the paths expected.
    """
    folder, names = FILES[task]
    if not data_dir:
        raise FileNotFoundError(
            f"tgsft_{task}: reads upstream files from eval.data_dir (or --data-dir), which is not set; "
            f"expected {folder}/{names[0]} under it"
        )
    base = Path(data_dir).expanduser() / folder
    for name in names:
        if (base / name).is_file():
            return base / name
    raise FileNotFoundError(f"tgsft_{task}: no data file; expected {' or '.join(str(base / n) for n in names)}")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (``.jsonl``) or a JSON array file (``.json``)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _labels(path: Path, n_rows: int) -> list[str] | None:
    labels_path = path.with_name(f"{path.stem}-labels.lst")
    if not labels_path.is_file():
        return None
    labels = [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]
    if len(labels) != n_rows:
        raise ValueError(f"{labels_path}: {len(labels)} labels for {n_rows} rows in {path}")
    return labels


# ----------------------------------------------------------------------------- upstream row -> HF row


def arc_row(raw: dict) -> dict:
    """AI2 ARC JSONL row -> ``allenai/ai2_arc`` row."""
    q = raw["question"]
    return {
        "id": raw["id"],
        "question": q["stem"],
        "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
        "answerKey": raw["answerKey"],
    }


def piqa_row(raw: dict, label: str) -> dict:
    """PIQA row + its line of ``*-labels.lst`` -> ``baber/piqa`` row."""
    return {"goal": raw["goal"], "sol1": raw["sol1"], "sol2": raw["sol2"], "label": int(label)}


def winogrande_row(raw: dict, label: str | None) -> dict:
    """WinoGrande row (+ optional label line) -> ``allenai/winogrande`` row (answer "1" or "2")."""
    answer = label if label is not None else raw.get("answer")
    if answer not in ("1", "2"):
        raise ValueError(f"winogrande row {raw.get('qID')}: no answer (need dev-labels.lst or an 'answer' field)")
    return {"sentence": raw["sentence"], "option1": raw["option1"], "option2": raw["option2"], "answer": answer}


def truthfulqa_row(raw: dict) -> dict:
    """TruthfulQA ``mc_task.json`` item -> ``truthfulqa/truthful_qa`` multiple_choice row.

    Upstream maps answer text -> 0/1; JSON keeps that order, which puts the true answer(s) first, as lm-eval's
    ``doc_to_target: 0`` assumes.
    """
    row = {"question": raw["question"]}
    for key in ("mc1_targets", "mc2_targets"):
        targets = raw[key]
        row[key] = {"choices": list(targets), "labels": [int(v) for v in targets.values()]}
    if row["mc1_targets"]["labels"][0] != 1:
        raise ValueError(f"truthfulqa: first mc1 choice of {raw['question']!r} is not the true one")
    return row


def _dataset(splits: dict[str, list[dict]]):
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


# ----------------------------------------------------------------------------- custom_dataset entry points


def arc_easy(data_dir: str | None = None, **_: Any):
    """ARC-Easy (Dev, else Test) as ai2_arc rows."""
    return _dataset({"test": [arc_row(r) for r in read_rows(find_file("arc_easy", data_dir))]})


def arc_challenge(data_dir: str | None = None, **_: Any):
    """ARC-Challenge (Dev, else Test) as ai2_arc rows."""
    return _dataset({"test": [arc_row(r) for r in read_rows(find_file("arc_challenge", data_dir))]})


def piqa(data_dir: str | None = None, **_: Any):
    """PIQA rows joined with their labels file."""
    path = find_file("piqa", data_dir)
    rows = read_rows(path)
    labels = _labels(path, len(rows))
    if labels is None:
        raise FileNotFoundError(f"tgsft_piqa: {path.with_name(path.stem + '-labels.lst')} is missing (PIQA labels)")
    return _dataset({"test": [piqa_row(r, lab) for r, lab in zip(rows, labels)]})


def sciq(data_dir: str | None = None, **_: Any):
    """SciQ (valid, else test) rows."""
    keys = ("question", "distractor3", "distractor1", "distractor2", "correct_answer", "support")
    return _dataset({"test": [{k: r[k] for k in keys} for r in read_rows(find_file("sciq", data_dir))]})


def winogrande(data_dir: str | None = None, **_: Any):
    """WinoGrande rows with labels from the labels file or the rows."""
    path = find_file("winogrande", data_dir)
    rows = read_rows(path)
    labels = _labels(path, len(rows)) or [None] * len(rows)
    return _dataset({"test": [winogrande_row(r, lab) for r, lab in zip(rows, labels)]})


def gsm8k(data_dir: str | None = None, **_: Any):
    """GSM8K test rows, plus train rows for few-shot examples."""
    path = find_file("gsm8k", data_dir)
    test = [{"question": r["question"], "answer": r["answer"]} for r in read_rows(path)]
    train_path = path.with_name("train.jsonl")
    if train_path.is_file():
        train = [{"question": r["question"], "answer": r["answer"]} for r in read_rows(train_path)]
    else:
        log.warning("tgsft_gsm8k: %s missing; few-shot examples come from the test file itself", train_path)
        train = test
    return _dataset({"test": test, "train": train})


def truthfulqa(data_dir: str | None = None, **_: Any):
    """TruthfulQA mc_task.json items as multiple_choice rows."""
    return _dataset({"test": [truthfulqa_row(r) for r in read_rows(find_file("truthfulqa", data_dir))]})


def general(**_: Any):
    """tgsft_general's built-in items."""
    rows = [{"question": q, "choices": list(c), "answer": a} for q, c, a in GENERAL_ITEMS]
    return _dataset({"test": rows})


# ----------------------------------------------------------------------------- tgsft_general items

# (question, choices, index of the correct choice): common knowledge written for this project, no external data.
GENERAL_ITEMS: list[tuple[str, tuple[str, ...], int]] = [
    ("What is the capital of France?", ("Berlin", "Paris", "Madrid", "Rome"), 1),
    ("How many days are there in a week?", ("five", "six", "seven", "eight"), 2),
    ("What do bees make?", ("honey", "milk", "silk", "wool"), 0),
    ("Which planet is closest to the Sun?", ("Venus", "Earth", "Mars", "Mercury"), 3),
    ("What is frozen water called?", ("steam", "ice", "sand", "glass"), 1),
    ("How many legs does a spider have?", ("four", "six", "eight", "ten"), 2),
    ("Which gas do plants take in from the air to make food?", ("carbon dioxide", "helium", "neon", "argon"), 0),
    ("What is the largest ocean on Earth?", ("Atlantic Ocean", "Indian Ocean", "Arctic Ocean", "Pacific Ocean"), 3),
    ("Which animal is known as the king of the jungle?", ("lion", "rabbit", "sheep", "mouse"), 0),
    ("What color do you get when you mix blue and yellow?", ("red", "green", "purple", "orange"), 1),
    ("How many hours are there in a day?", ("twelve", "eighteen", "twenty-four", "thirty"), 2),
    ("What is the boiling point of water at sea level in degrees Celsius?", ("50", "75", "100", "150"), 2),
    ("Which organ pumps blood through the human body?", ("lungs", "heart", "liver", "stomach"), 1),
    ("What is the opposite of hot?", ("cold", "tall", "loud", "fast"), 0),
    ("Which season comes after winter?", ("autumn", "summer", "spring", "fall"), 2),
    ("What do you use to write on a blackboard?", ("chalk", "soap", "butter", "paint roller"), 0),
    ("How many continents are there on Earth?", ("three", "five", "seven", "nine"), 2),
    ("What is the main language spoken in Brazil?", ("Spanish", "Portuguese", "French", "Italian"), 1),
    ("Which star gives light and heat to the Earth?", ("the Moon", "Polaris", "the Sun", "Sirius"), 2),
    ("What is 7 plus 5?", ("10", "11", "12", "13"), 2),
    ("Which instrument has black and white keys?", ("drum", "piano", "trumpet", "violin"), 1),
    ("What do caterpillars turn into?", ("butterflies", "spiders", "frogs", "birds"), 0),
    ("Which of these is a mammal?", ("shark", "eagle", "whale", "lizard"), 2),
    ("What is the capital of Japan?", ("Beijing", "Seoul", "Bangkok", "Tokyo"), 3),
    ("Which shape has three sides?", ("square", "triangle", "circle", "hexagon"), 1),
    ("What do we call a baby dog?", ("kitten", "calf", "puppy", "foal"), 2),
    ("Which metal is liquid at room temperature?", ("iron", "mercury", "copper", "silver"), 1),
    ("Who wrote the play Romeo and Juliet?",
     ("Charles Dickens", "Mark Twain", "William Shakespeare", "Jane Austen"), 2),
    ("What is the chemical symbol for water?", ("H2O", "CO2", "NaCl", "O3"), 0),
    ("How many minutes are in an hour?", ("thirty", "sixty", "ninety", "one hundred"), 1),
    ("Which direction does the Sun rise in?", ("west", "north", "south", "east"), 3),
    ("What is the tallest animal in the world?", ("elephant", "giraffe", "horse", "camel"), 1),
]

# More items built from small fact tables written for this project: each question's three distractors are other
# answers of the same table, drawn with a generator seeded by the question, so the items never change.
_FACTS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "capital": ("What is the capital of {}?", [
        ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("England", "London"), ("Russia", "Moscow"),
        ("China", "Beijing"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("Canada", "Ottawa"),
        ("Australia", "Canberra"), ("India", "New Delhi"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"),
        ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
        ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Turkey", "Ankara"), ("Kenya", "Nairobi"),
        ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Peru", "Lima"), ("Cuba", "Havana"),
        ("the United States", "Washington, D.C."), ("Denmark", "Copenhagen"), ("Finland", "Helsinki"),
        ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"),
        ("Switzerland", "Bern"), ("Chile", "Santiago"), ("Colombia", "Bogota"), ("Indonesia", "Jakarta"),
        ("the Philippines", "Manila"), ("Vietnam", "Hanoi"), ("Iran", "Tehran"), ("Scotland", "Edinburgh"),
        ("Czechia", "Prague")]),
    "opposite": ("What is the opposite of {}?", [
        ("big", "small"), ("up", "down"), ("day", "night"), ("open", "closed"), ("happy", "sad"), ("fast", "slow"),
        ("young", "old"), ("light", "dark"), ("wet", "dry"), ("full", "empty"), ("early", "late"),
        ("strong", "weak"), ("rich", "poor"), ("hard", "soft"), ("loud", "quiet"), ("long", "short"),
        ("first", "last"), ("inside", "outside"), ("win", "lose"), ("buy", "sell"), ("push", "pull"),
        ("clean", "dirty"), ("thick", "thin"), ("heavy", "light"), ("true", "false"), ("left", "right"),
        ("love", "hate"), ("begin", "end"), ("give", "take"), ("north", "south"), ("east", "west"),
        ("arrive", "leave"), ("asleep", "awake"), ("sweet", "sour"), ("friend", "enemy"), ("question", "answer"),
        ("above", "below"), ("cheap", "expensive"), ("safe", "dangerous"), ("remember", "forget")]),
    "young": ("What is a young {} called?", [
        ("cat", "kitten"), ("cow", "calf"), ("sheep", "lamb"), ("horse", "foal"), ("duck", "duckling"),
        ("frog", "tadpole"), ("goat", "kid"), ("bear", "cub"), ("pig", "piglet"), ("goose", "gosling"),
        ("swan", "cygnet"), ("kangaroo", "joey"), ("owl", "owlet"), ("hen", "chick"), ("deer", "fawn")]),
    "day_after": ("Which day comes after {}?", [
        ("Monday", "Tuesday"), ("Tuesday", "Wednesday"), ("Wednesday", "Thursday"), ("Thursday", "Friday"),
        ("Friday", "Saturday"), ("Saturday", "Sunday"), ("Sunday", "Monday")]),
    "month_after": ("Which month comes after {}?", [
        ("January", "February"), ("February", "March"), ("March", "April"), ("April", "May"), ("May", "June"),
        ("June", "July"), ("July", "August"), ("August", "September"), ("September", "October"),
        ("October", "November"), ("November", "December"), ("December", "January")]),
    "how_many": ("How many {}?", [
        ("sides does a triangle have", "three"), ("sides does a square have", "four"),
        ("sides does a pentagon have", "five"), ("sides does a hexagon have", "six"),
        ("sides does an octagon have", "eight"), ("legs does an insect have", "six"),
        ("legs does a bird have", "two"), ("legs does a dog have", "four"), ("months are there in a year", "twelve"),
        ("days are there in a year", "three hundred and sixty-five"), ("seconds are in a minute", "sixty"),
        ("years are in a century", "one hundred"), ("wheels does a bicycle have", "two"),
        ("wheels does a tricycle have", "three"), ("players are on a tennis doubles team", "two"),
        ("eyes does a person have", "two"), ("fingers are on one human hand", "five"),
        ("planets are in the Solar System", "eight"), ("strings does a standard guitar have", "six"),
        ("cents make one US dollar", "one hundred")]),
    "color": ("What color is {}?", [
        ("a clear daytime sky", "blue"), ("fresh grass", "green"), ("a ripe banana", "yellow"), ("snow", "white"),
        ("coal", "black"), ("a ripe strawberry", "red"), ("a carrot", "orange"), ("chocolate", "brown"),
        ("a lemon", "yellow"), ("a polar bear's fur", "white"), ("a fire engine", "red"), ("a crow", "black"),
        ("an emerald", "green"), ("a pumpkin", "orange"), ("milk", "white")]),
    "plural": ("What is the plural of {}?", [
        ("mouse", "mice"), ("child", "children"), ("foot", "feet"), ("tooth", "teeth"), ("goose", "geese"),
        ("man", "men"), ("woman", "women"), ("person", "people"), ("knife", "knives"), ("leaf", "leaves"),
        ("box", "boxes"), ("baby", "babies"), ("city", "cities"), ("wolf", "wolves"), ("potato", "potatoes")]),
    "language": ("What is the main language spoken in {}?", [
        ("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"),
        ("Japan", "Japanese"), ("China", "Chinese"), ("Russia", "Russian"), ("Greece", "Greek"),
        ("Portugal", "Portuguese"), ("Turkey", "Turkish"), ("Poland", "Polish"), ("the Netherlands", "Dutch"),
        ("Sweden", "Swedish"), ("Korea", "Korean"), ("England", "English")]),
    "sound": ("What sound does a {} make?", [
        ("dog", "bark"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("lion", "roar"),
        ("sheep", "baa"), ("snake", "hiss"), ("horse", "neigh"), ("owl", "hoot"), ("bee", "buzz")]),
    "sum": ("What is {}?", [
        (f"{a} plus {b}", str(a + b)) for a, b in [(2, 3), (4, 4), (6, 3), (5, 5), (7, 2), (8, 6), (9, 9),
                                                    (3, 4), (10, 10), (12, 3), (20, 5), (15, 15), (6, 7), (11, 2),
                                                    (30, 40)]]),
}
# one question wording per member of a kind, so every question text is distinct
_KIND_WORDINGS = ("Which of these is a {}?", "Which one is a {}?", "Which word names a {}?",
                  "Which of the following is a {}?", "Which is a kind of {}?", "Pick the {}:")
# kind -> (members, non-members): "Which of these is a fruit?" with one member and three non-members
_KINDS: dict[str, tuple[list[str], list[str]]] = {
    "fruit": (["apple", "banana", "cherry", "grape", "mango", "pear"], ["carrot", "potato", "onion", "lettuce",
                                                                         "bread", "cheese"]),
    "vegetable": (["carrot", "potato", "onion", "cabbage", "pea", "spinach"], ["apple", "banana", "milk", "rice",
                                                                               "egg", "honey"]),
    "bird": (["eagle", "sparrow", "parrot", "penguin", "owl", "robin"], ["dog", "salmon", "frog", "ant", "horse",
                                                                         "snake"]),
    "fish": (["salmon", "trout", "tuna", "cod", "goldfish", "shark"], ["whale", "dolphin", "crab", "seal", "frog",
                                                                       "duck"]),
    "musical instrument": (["violin", "flute", "guitar", "piano", "trumpet", "drum"], ["hammer", "spoon", "chair",
                                                                                       "kettle", "pencil", "shoe"]),
    "vehicle": (["car", "bus", "bicycle", "train", "truck", "boat"], ["lamp", "table", "tree", "cup", "pillow",
                                                                     "book"]),
    "planet": (["Mars", "Venus", "Jupiter", "Saturn", "Neptune", "Mercury"], ["the Moon", "the Sun", "Paris",
                                                                              "Everest", "the Nile", "Sirius"]),
}


def _fact_items() -> list[tuple[str, tuple[str, ...], int]]:
    import random

    items = []
    for category, (template, facts) in _FACTS.items():
        answers = sorted({a for _, a in facts})
        for subject, answer in facts:
            rng = random.Random(f"{category}:{subject}")
            choices = rng.sample([a for a in answers if a != answer], 3)
            pos = rng.randrange(4)
            choices.insert(pos, answer)
            items.append((template.format(subject), tuple(choices), pos))
    for kind, (members, others) in _KINDS.items():
        for member, wording in zip(members, _KIND_WORDINGS, strict=True):
            rng = random.Random(f"kind:{kind}:{member}")
            choices = rng.sample(others, 3)
            pos = rng.randrange(4)
            choices.insert(pos, member)
            items.append((wording.format(kind), tuple(choices), pos))
    return items


GENERAL_ITEMS += _fact_items()
