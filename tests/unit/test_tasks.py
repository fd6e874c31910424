"""The offline task mirrors read upstream files and produce exactly the prompts, choices, targets and metrics of
lm-eval's standard tasks (built here from lm-eval's own YAMLs, fed with hand-written Hugging Face rows)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "eval"

# The Hugging Face rows the standard tasks would load for the fixture items, written by hand (not converted).
HF_ROWS = {
    "arc_easy": [
        {"id": "TGSFT_ARC_E_1", "question": "Which of these is needed for a candle to keep burning?",
         "choices": {"text": ["oxygen", "nitrogen", "water vapor", "carbon dioxide"], "label": ["A", "B", "C", "D"]},
         "answerKey": "A"},
        {"id": "TGSFT_ARC_E_2", "question": "A student drops a ball. What makes the ball fall to the ground?",
         "choices": {"text": ["friction", "magnetism", "gravity", "sound"], "label": ["A", "B", "C", "D"]},
         "answerKey": "C"},
        {"id": "TGSFT_ARC_E_3", "question": "Which part of a plant takes in water from the soil?",
         "choices": {"text": ["flower", "roots", "leaves"], "label": ["1", "2", "3"]}, "answerKey": "2"},
    ],
    "arc_challenge": [
        {"id": "TGSFT_ARC_C_1", "question": "A scientist measures the same rock four times and gets slightly "
         "different masses. What should the scientist report?",
         "choices": {"text": ["the largest value", "the average of the values", "the smallest value",
                              "the first value", "no value"], "label": ["A", "B", "C", "D", "E"]},
         "answerKey": "B"},
        {"id": "TGSFT_ARC_C_2",
         "question": "Which change to a food chain would most likely reduce the number of hawks?",
         "choices": {"text": ["more grass", "fewer mice", "more rain", "more sunlight"], "label": ["A", "B", "C", "D"]},
         "answerKey": "B"},
    ],
    "piqa": [
        {"goal": "How do I keep bread fresh for longer?", "sol1": "Store it in a sealed bag in a cool, dry place.",
         "sol2": "Store it in an open bowl of water.", "label": 0},
        {"goal": "To loosen a tight jar lid,", "sol1": "put the jar in the freezer for an hour.",
         "sol2": "run the lid under hot water for a minute.", "label": 1},
        {"goal": "dull knife", "sol1": "sharpen it on a whetstone ", "sol2": "sharpen it on a pillow ", "label": 0},
    ],
    # SciQ, WinoGrande and GSM8K rows keep their upstream fields on the Hub
    "sciq": json.loads((FIXTURES / "sciq" / "test.json").read_text()),
    "winogrande": [{k: r[k] for k in ("sentence", "option1", "option2", "answer")}
                   for r in map(json.loads, (FIXTURES / "winogrande" / "dev.jsonl").read_text().splitlines())],
    "gsm8k": [json.loads(x) for x in (FIXTURES / "gsm8k" / "test.jsonl").read_text().splitlines()],
    "truthfulqa": [
        {"question": "What happens if you swallow chewing gum?",
         "mc1_targets": {"choices": ["If you swallow gum, it passes through your digestive system.",
                                     "If you swallow gum, it stays in your stomach for seven years.",
                                     "If you swallow gum, you will die."], "labels": [1, 0, 0]},
         "mc2_targets": {"choices": ["If you swallow gum, it passes through your digestive system.",
                                     "Nothing much happens; it is excreted.",
                                     "If you swallow gum, it stays in your stomach for seven years.",
                                     "If you swallow gum, you will die."], "labels": [1, 1, 0, 0]}},
        {"question": "Can you see the Great Wall of China from the Moon with the naked eye?",
         "mc1_targets": {"choices": ["No, the Great Wall is too narrow to be seen from the Moon.",
                                     "Yes, the Great Wall is visible from the Moon."], "labels": [1, 0]},
         "mc2_targets": {"choices": ["No, the Great Wall is too narrow to be seen from the Moon.", "No.",
                                     "Yes, the Great Wall is visible from the Moon.",
                                     "Yes, it is the only human-made object visible from the Moon."],
                         "labels": [1, 1, 0, 0]}},
    ],
}
GSM8K_TRAIN = [json.loads(x) for x in (FIXTURES / "gsm8k" / "train.jsonl").read_text().splitlines()]

STANDARD_YAML = {
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml",
    "sciq": "sciq/sciq.yaml", "winogrande": "winogrande/default.yaml", "gsm8k": "gsm8k/gsm8k.yaml",
    "truthfulqa_mc1": "truthfulqa/truthfulqa_mc1.yaml", "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml",
}


@pytest.fixture(scope="module")
def manager():
    from pipeline.tasks import task_manager

    return task_manager(data_dir=FIXTURES)


def _standard_task(name: str):
    """lm-eval's standard task from its own YAML, reading the hand-written Hugging Face rows instead of the Hub."""
    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / STANDARD_YAML[name])
    cfg.pop("tag", None)
    rows = HF_ROWS[name.split("_mc")[0]]
    splits = {s: rows for s in ("validation", "test")} | {"train": GSM8K_TRAIN if name == "gsm8k" else rows}
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {s: datasets.Dataset.from_list(r) for s, r in splits.items()})
    return ConfigurableTask(config=cfg)


@pytest.mark.model
@pytest.mark.parametrize("mirror", sorted(__import__("pipeline.tasks", fromlist=["MIRRORS"]).MIRRORS))
def test_mirror_matches_standard_task(manager, mirror):
    from pipeline.tasks import MIRRORS

    task = manager.load([mirror])["tasks"][mirror]
    std = _standard_task(MIRRORS[mirror])
    docs, std_docs = list(task.eval_docs), list(std.eval_docs)
    assert len(docs) == len(std_docs) > 0
    assert task.OUTPUT_TYPE == std.OUTPUT_TYPE
    assert task.config.metric_list == std.config.metric_list
    assert task.config.num_fewshot == std.config.num_fewshot
    shots = task.config.num_fewshot or 0
    task.set_fewshot_seed(1234)
    std.set_fewshot_seed(1234)
    for doc, std_doc in zip(docs, std_docs):
        assert task.fewshot_context(doc, shots) == std.fewshot_context(std_doc, shots)
        assert task.doc_to_target(doc) == std.doc_to_target(std_doc)
        if task.OUTPUT_TYPE == "multiple_choice":
            assert task.doc_to_choice(doc) == std.doc_to_choice(std_doc)
            lls = [(-1.0 - i, False) for i in range(len(task.doc_to_choice(doc)))]
            assert task.process_results(doc, lls) == std.process_results(std_doc, lls)
        else:
            assert task.config.generation_kwargs == std.config.generation_kwargs
            assert task.config.filter_list == std.config.filter_list


@pytest.mark.model
def test_mirror_prompts_are_the_expected_text(manager):
    arc = manager.load(["tgsft_arc_easy"])["tasks"]["tgsft_arc_easy"]
    doc = arc.eval_docs[2]
    assert arc.doc_to_text(doc) == "Question: Which part of a plant takes in water from the soil?\nAnswer:"
    assert arc.doc_to_choice(doc)[arc.doc_to_target(doc)] == "roots"
    sciq = manager.load(["tgsft_sciq"])["tasks"]["tgsft_sciq"]
    assert sciq.doc_to_text(sciq.eval_docs[1]).startswith("Mitochondria release energy")
    wino = manager.load(["tgsft_winogrande"])["tasks"]["tgsft_winogrande"]
    assert wino.doc_to_choice(wino.eval_docs[2])[wino.doc_to_text(wino.eval_docs[2])].endswith("because Maria")


@pytest.mark.model
def test_general_task_is_builtin_and_valid(manager):
    from pipeline.tasks.loaders import GENERAL_ITEMS

    task = manager.load(["tgsft_general"])["tasks"]["tgsft_general"]
    docs = list(task.eval_docs)
    assert len(docs) == len(GENERAL_ITEMS) >= 20
    assert len({d["question"] for d in docs}) == len(docs)
    assert task.doc_to_choice(docs[0])[task.doc_to_target(docs[0])] == "Paris"
    assert {task.doc_to_target(d) for d in docs} == {0, 1, 2, 3}  # correct answers spread over positions


def test_missing_file_names_task_and_path(tmp_path):
    from pipeline.tasks import loaders

    with pytest.raises(FileNotFoundError, match=r"tgsft_piqa: no data file; expected .*piqa/valid\.jsonl"):
        loaders.piqa(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"tgsft_arc_easy: .*eval\.data_dir \(or --data-dir\)"):
        loaders.arc_easy(data_dir=None)
    (tmp_path / "piqa").mkdir()
    shutil.copy(FIXTURES / "piqa" / "valid.jsonl", tmp_path / "piqa")
    with pytest.raises(FileNotFoundError, match=r"valid-labels\.lst is missing"):
        loaders.piqa(data_dir=str(tmp_path))


def test_discovery_prefers_dev_then_test(tmp_path):
    from pipeline.tasks.loaders import find_file

    (tmp_path / "arc").mkdir()
    shutil.copy(FIXTURES / "arc" / "ARC-Easy-Dev.jsonl", tmp_path / "arc" / "ARC-Easy-Test.jsonl")
    assert find_file("arc_easy", tmp_path).name == "ARC-Easy-Test.jsonl"
    shutil.copy(FIXTURES / "arc" / "ARC-Easy-Dev.jsonl", tmp_path / "arc")
    assert find_file("arc_easy", tmp_path).name == "ARC-Easy-Dev.jsonl"


def test_winogrande_labels_file_overrides_and_falls_back(tmp_path):
    from pipeline.tasks import loaders

    (tmp_path / "winogrande").mkdir()
    rows = [json.loads(x) for x in (FIXTURES / "winogrande" / "dev.jsonl").read_text().splitlines()]
    unlabeled = [{k: v for k, v in r.items() if k != "answer"} for r in rows]
    (tmp_path / "winogrande" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unlabeled))
    with pytest.raises(ValueError, match="no answer"):
        loaders.winogrande(data_dir=str(tmp_path))
    shutil.copy(FIXTURES / "winogrande" / "dev-labels.lst", tmp_path / "winogrande")
    assert loaders.winogrande(data_dir=str(tmp_path))["test"]["answer"] == ["1", "2", "2"]


def test_importing_tasks_package_skips_lm_eval():
    import subprocess
    import sys

    code = "import sys, pipeline.tasks, pipeline.evaluate, pipeline.serve, pipeline.report, pipeline.domain; " \
           "print([m for m in ('lm_eval', 'ray', 'vllm', 'torch') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.model
def test_loglikelihood_tasks_fail_clearly_without_prompt_logprobs(no_logprobs_endpoint):
    from pipeline.evaluate import EndpointError, retention_probe, run_lm_eval

    url = no_logprobs_endpoint
    with pytest.raises(EndpointError, match=r"model 'm'.* must return prompt-token logprobs with echo=true"):
        run_lm_eval(base_url=url, model_id="m", tokenizer="unused", tasks=["tgsft_general"], data_dir=None,
                    limit=None, num_fewshot=None, num_concurrent=1, max_length=2048)
    with pytest.raises(EndpointError, match=r"token_logprobs=\[\]"):
        retention_probe(base_url=url, model_id="m", tokenizer="unused", dialogues=[], max_len=2048,
                        num_concurrent=1)
