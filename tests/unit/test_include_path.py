"""``eval.include_path``: the user's own lm-eval task YAMLs are known beside the standard tasks and the mirrors,
are checked before anything is served, and load their local data; a missing folder is named."""

from __future__ import annotations

import json

import pytest

from pipeline.config import load_config

pytestmark = pytest.mark.model  # lm-eval

ROWS = [{"question": "What colour is the sky on a clear day?", "choices": ["green", "blue"], "answer": 1},
        {"question": "How many legs has a cat?", "choices": ["four", "six"], "answer": 0}]


@pytest.fixture
def include_path(tmp_path):
    folder = tmp_path / "my_tasks" / "qa"
    folder.mkdir(parents=True)
    data = folder / "my_qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "my_qa.yaml").write_text(
        "task: my_qa\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return str(tmp_path / "my_tasks")


def test_own_tasks_are_known_and_load(include_path):
    from pipeline.evaluate import check_tasks
    from pipeline.tasks import task_manager

    cfg = load_config(None, overrides=[f"eval.include_path={include_path}", "eval.tasks=[my_qa,tgsft_general]"])
    check_tasks(cfg.eval.tasks, cfg.eval.data_dir, cfg.eval.include_path)
    loaded = task_manager(data_dir=None, include_path=include_path).load(["my_qa"])["tasks"]
    (task,) = loaded.values()
    docs = list(task.test_docs())
    assert [task.doc_to_text(d) for d in docs] == [f"Question: {r['question']}\nAnswer:" for r in ROWS]
    assert [task.doc_to_target(d) for d in docs] == [1, 0]


def test_own_tasks_are_unknown_without_the_include_path(include_path):
    from pipeline.evaluate import check_tasks

    with pytest.raises(ValueError, match="eval.tasks: unknown task 'my_qa'"):
        check_tasks(["my_qa"], None)


def test_a_missing_include_path_is_named(tmp_path):
    from pipeline.evaluate import check_tasks

    with pytest.raises(FileNotFoundError, match=f"eval.include_path: {tmp_path / 'nope'} is not a directory"):
        check_tasks(["tgsft_general"], None, str(tmp_path / "nope"))
