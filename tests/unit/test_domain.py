"""The built-in extraction domain is deterministic, held out by construction, and scored as documented."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.domain import (
    INSTRUCTION,
    build_domain,
    parse_json_object,
    score_item,
    score_items,
    split_reference,
    token_f1,
)
from pipeline.stats import mean_stderr


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_build_domain_is_deterministic_and_well_formed(tmp_path):
    train, held = build_domain(tmp_path / "a", n_train=240, n_eval=60, seed=0)
    again = build_domain(tmp_path / "b", seed=0)
    other = build_domain(tmp_path / "c", seed=1)
    assert train.read_bytes() == again[0].read_bytes() and held.read_bytes() == again[1].read_bytes()
    assert train.read_bytes() != other[0].read_bytes()
    rows = _rows(train)
    assert len(rows) == 240 and len(_rows(held)) == 60
    first = rows[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert first[0]["content"].startswith(INSTRUCTION)
    answer = json.loads(first[1]["content"])
    assert list(answer) == ["person", "city", "year"] and isinstance(answer["year"], int)
    sentence = first[0]["content"][len(INSTRUCTION):]
    assert answer["person"] in sentence and answer["city"] in sentence and str(answer["year"]) in sentence


def test_eval_names_cities_and_sentences_never_in_training(tmp_path):
    train, held = build_domain(tmp_path)
    answers = lambda p: [json.loads(r["messages"][1]["content"]) for r in _rows(p)]  # noqa: E731
    tr, ev = answers(train), answers(held)
    assert not {a["person"] for a in tr} & {a["person"] for a in ev}
    assert not {a["city"] for a in tr} & {a["city"] for a in ev}
    prompts = lambda p: {r["messages"][0]["content"] for r in _rows(p)}  # noqa: E731
    assert not prompts(train) & prompts(held)
    assert len(prompts(train)) == 240  # no duplicate training sentences


def test_json_parsing_and_field_scores():
    ref = '{"person": "Maria", "city": "Lyon", "year": 1998}'
    assert parse_json_object('Sure! ```json\n{"person": "Maria", "city": "Lyon", "year": 1998}\n```') == json.loads(ref)
    assert parse_json_object("no json here {oops") is None
    assert score_item(ref, ref) == {"exact_match": 1.0, "token_f1": 1.0, "json_exact": 1.0, "field_acc": 1.0}
    wrong_year = score_item('Here: {"person": "Maria", "city": "Lyon", "year": "1998"}', ref)
    assert wrong_year["json_exact"] == 0.0 and wrong_year["field_acc"] == pytest.approx(2 / 3)
    assert wrong_year["exact_match"] == 0.0
    assert score_item("Maria lives in Lyon.", ref)["field_acc"] == 0.0


def test_text_metrics_for_user_domains():
    assert score_item("  The answer\n is 42 ", "The answer is 42") == {"exact_match": 1.0, "token_f1": 1.0}
    assert token_f1("the cat sat", "the cat sat down") == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_score_items_mean_and_stderr():
    out = score_items(["a", "b", "c", "x"], ["a", "b", "c", "d"])
    assert out["exact_match"]["value"] == pytest.approx(0.75)
    assert out["exact_match"]["stderr"] == pytest.approx((0.25 / 4) ** 0.5)  # sample std 0.5, n = 4
    assert "json_exact" not in out  # references are not JSON
    assert score_items(["a"], ["a"])["exact_match"] == {"value": 1.0, "stderr": 0.0, "higher_is_better": True}
    mean, se = mean_stderr([])
    assert math.isnan(mean) and se is None


def test_reference_is_the_last_assistant_message(tmp_path):
    from pipeline.data import load_examples

    path = tmp_path / "eval.jsonl"
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"}]}
    path.write_text(json.dumps(row) + "\n")
    [messages] = load_examples([path]).examples  # the loader evaluate uses for user eval files
    prompt, reference = split_reference(messages)
    assert reference == "4" and [m["content"] for m in prompt] == ["Be brief.", "Hi", "Hello", "2+2?"]
    with pytest.raises(ValueError, match="no assistant message"):
        split_reference([{"role": "user", "content": "Hi"}])
