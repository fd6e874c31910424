"""Per-item scores from lm-eval's per-sample records: metrics per doc id and the gold answer's log-prob per byte."""

from __future__ import annotations

import pytest

from pipeline.evaluate import item_scores


def _mc(doc_id: int, target, lls: list[float], conts: list[str], acc: float) -> dict:
    return {"doc_id": doc_id, "target": target, "metrics": ["acc", "acc_norm"], "acc": acc, "acc_norm": acc,
            "arguments": [("Question: q\nAnswer:", c) for c in conts],
            "filtered_resps": [(ll, False) for ll in lls]}


def test_multiple_choice_items_in_doc_order_with_gold_logprob_per_byte():
    records = [
        _mc(1, 0, [-3.0, -1.0], [" cat", " kitten"], 0.0),
        _mc(0, "kitten", [-4.0, -2.0], [" cat", " kitten"], 1.0),  # a string target names its continuation
    ]
    out = item_scores(records)
    assert out["ids"] == [0, 1] and out["acc"] == [1.0, 0.0] and out["acc_norm"] == [1.0, 0.0]
    # " kitten" is 7 bytes, " cat" 4 (the target delimiter counts)
    assert out["gold_logprob_per_byte"] == pytest.approx([-2.0 / 7, -3.0 / 4])


def test_no_gold_logprob_when_the_gold_is_not_one_continuation():
    # WinoGrande-style: the options sit in the contexts, every continuation is the same
    same = [_mc(0, "the rest", [-1.0, -2.0], [" the rest", " the rest"], 1.0)]
    assert "gold_logprob_per_byte" not in item_scores(same)
    generated = [{"doc_id": 0, "target": "42", "metrics": ["exact_match"], "exact_match": 1.0,
                  "arguments": [("Q: 6*7?", {"until": ["\n"]})], "filtered_resps": ["42"]}]
    out = item_scores(generated)
    assert out == {"ids": [0], "exact_match": [1.0]}
