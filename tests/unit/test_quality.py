"""Corpus quality and coverage metrics on hand-made texts, vectors and corpora with known answers."""

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from pipeline import quality, textmetrics
from pipeline.corpus import NODE_SCHEMA
from pipeline.reference import read_reference, reference_questions
from pipeline.tasks.loaders import GENERAL_ITEMS
from tests.unit.corpora import DISTINCT, bow_embed, node, write_corpus

# ----------------------------------------------------------------------------- text metrics


def test_distinct_n_extremes_and_a_count():
    assert textmetrics.distinct_n(["a b c d"], 2) == 1.0
    assert textmetrics.distinct_n(["a b c d"] * 4, 2) == pytest.approx(3 / 12)  # 3 bigrams, 4 copies
    assert textmetrics.distinct_n(["The cat, the cat."], 1) == pytest.approx(4 / 6)  # the cat , the cat .
    assert textmetrics.distinct_n(["one"], 2) is None
    assert textmetrics.distinct_n(DISTINCT, 2) == 1.0


def test_self_bleu_is_100_for_copies_and_low_for_distinct_texts():
    same, n = textmetrics.self_bleu(["how do i bake bread at home"] * 5)
    assert same == pytest.approx(100.0) and n == 5
    varied, _ = textmetrics.self_bleu(DISTINCT)
    assert varied < 10
    assert textmetrics.self_bleu(["only one"]) == (None, 1)
    assert textmetrics.self_bleu([f"question number {i} here" for i in range(50)], sample=10)[1] == 10


def test_complete_sentence_rate():
    texts = ["It is Paris.", "Done!", 'He said "yes."', "(see above.)", "It is", "```py\nx = 1\n```", "Why?  "]
    assert textmetrics.complete_sentence_rate(texts) == pytest.approx(6 / 7)
    assert textmetrics.complete_sentence_rate([]) is None


# ----------------------------------------------------------------------------- embedding metrics


def test_mean_pairwise_cosine_extremes():
    same = np.tile(np.array([[0.6, 0.8]], np.float32), (5, 1))
    assert textmetrics.mean_pairwise_cosine(same) == pytest.approx(1.0)
    assert textmetrics.mean_pairwise_cosine(np.eye(4, dtype=np.float32)) == pytest.approx(0.0)
    opposite = np.array([[1, 0], [-1, 0]], np.float32)
    assert textmetrics.mean_pairwise_cosine(opposite) == pytest.approx(-1.0)
    assert textmetrics.mean_pairwise_cosine(np.eye(1, dtype=np.float32)) is None


def test_cluster_entropy_extremes():
    same = np.tile(np.eye(8, dtype=np.float32)[:1], (8, 1))
    h, sizes = textmetrics.cluster_entropy(same, clusters=4)
    assert h == pytest.approx(0.0) and sizes == [8, 0, 0, 0]
    spread = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)  # 4 tight groups of 3
    h, sizes = textmetrics.cluster_entropy(spread, clusters=4)
    assert h == pytest.approx(1.0) and sizes == [3, 3, 3, 3]
    two = np.repeat(np.eye(2, dtype=np.float32), [6, 2], axis=0)
    h, _ = textmetrics.cluster_entropy(two, clusters=2)
    assert h == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2))


def test_duplicate_rates():
    texts = ["What is X?", "what is  x?", "Something else", "A third one"]
    emb = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0.8, 0.6]], np.float32)
    r = textmetrics.duplicate_rates(texts, emb, near_threshold=0.75)
    assert r["exact_duplicate_rate"] == pytest.approx(0.25)
    assert r["near_duplicate_rate"] == pytest.approx(1.0)  # 0-1 identical, 2-3 at cosine 0.8
    assert textmetrics.duplicate_rates(texts, emb, near_threshold=0.9)["near_duplicate_rate"] == pytest.approx(0.5)


def test_coverage_of_itself_is_one_and_of_an_unrelated_set_zero():
    corpus = np.eye(6, dtype=np.float32)[:3]
    full = textmetrics.coverage({"self": corpus}, corpus)
    assert full["value"] == 1.0 and full["mean_nearest"] == pytest.approx(1.0) and full["n"] == 3
    assert all(share == 1.0 for _, share in full["curve"])
    none = textmetrics.coverage({"other": np.eye(6, dtype=np.float32)[3:]}, corpus)
    assert none["value"] == 0.0 and none["curve"][0] == [0.3, 0.0]
    mixed = textmetrics.coverage({"a": corpus[:1], "b": np.eye(6, dtype=np.float32)[4:]}, corpus, threshold=0.5)
    assert mixed["value"] == pytest.approx(1 / 3)
    assert mixed["by_source"]["a"]["value"] == 1.0 and mixed["by_source"]["b"]["value"] == 0.0
    assert textmetrics.coverage({}, corpus) is None


def test_level_stats_rates_and_reasons():
    nodes = pa.Table.from_pylist([
        node(1, 0, "user", "a"), node(1, 1, "user", "b", finish="length"),
        node(1, 2, "user", "c", finish="length", status="dropped", drop="truncated"),
        node(1, 3, "user", "d", status="dropped", drop="near_duplicate"),
        node(2, 0, "assistant", "x"),
    ], schema=NODE_SCHEMA)
    s = textmetrics.level_stats(nodes)
    assert s["1"] == {"generated": 4, "kept": 2, "truncated_rate": 0.5, "trimmed_rate": 0.25, "drop_rate": 0.5,
                      "dropped": {"near_duplicate": 1, "truncated": 1}}
    assert s["2"]["kept"] == 1 and s["2"]["dropped"] == {}


# ----------------------------------------------------------------------------- whole corpora


def test_measure_identical_questions_hit_the_extremes(tmp_path):
    q = "What is the capital of France?"
    corpus = write_corpus(tmp_path / "same", [q] * 6, ["It is Paris."] * 6)
    m = quality.measure(corpus, embed=bow_embed, reference={"self": [q]})
    assert m["questions"] == m["answers"] == m["dialogues"] == 6
    assert m["distinct_2"] == pytest.approx(1 / 6)
    assert m["self_bleu"] == pytest.approx(100.0)
    assert m["mean_pairwise_cosine"] == pytest.approx(1.0)
    assert m["cluster_entropy"] == pytest.approx(0.0)
    assert m["exact_duplicate_rate"] == pytest.approx(5 / 6) and m["near_duplicate_rate"] == 1.0
    assert m["complete_sentence_rate"] == 1.0
    assert m["coverage"]["value"] == 1.0


def test_measure_distinct_questions_and_coverage(tmp_path):
    answers = ["Paris.", "From nectar", "Light to sugar.", "Scattering.", "Snow falls softly."]
    extra = [node(1, 9, "user", "", status="dropped", drop="empty", n_tokens=1)]
    corpus = write_corpus(tmp_path / "varied", DISTINCT, answers, extra_level1=extra)
    m = quality.measure(corpus, embed=bow_embed, reference={"self": DISTINCT, "unrelated": ["zebra xylophone"]})
    assert m["distinct_2"] == 1.0 and m["self_bleu"] < 10
    assert m["mean_pairwise_cosine"] < 0.2
    assert m["cluster_entropy"] == pytest.approx(1.0)  # k = 5 clusters for 5 questions, one each
    assert m["exact_duplicate_rate"] == 0.0 and m["near_duplicate_rate"] == 0.0
    assert m["complete_sentence_rate"] == pytest.approx(4 / 5)
    assert m["coverage"]["by_source"] == {
        "self": {"n": 5, "value": 1.0, "mean_nearest": pytest.approx(1.0)},
        "unrelated": {"n": 1, "value": 0.0, "mean_nearest": pytest.approx(0.0)},
    }
    assert m["levels"]["1"]["dropped"] == {"empty": 1} and m["levels"]["1"]["generated"] == 6
    assert m["lengths"]["question"]["n"] == 5 and m["lengths"]["question"]["max"] == 8
    json.dumps(m)  # JSON-ready


def test_measure_without_embedder_leaves_embedding_metrics_out(tmp_path):
    corpus = write_corpus(tmp_path / "c", DISTINCT[:3], ["a.", "b.", "c."])
    m = quality.measure(corpus, embed=None, reference={"self": DISTINCT})
    assert m["distinct_2"] == 1.0
    assert m["mean_pairwise_cosine"] is None and m["cluster_entropy"] is None and m["coverage"] is None
    assert m["near_duplicate_rate"] is None and m["embedded_questions"] == 0


def test_measure_samples_big_corpora(tmp_path):
    questions = [f"question {i} about topic {i % 7}" for i in range(40)]
    corpus = write_corpus(tmp_path / "big", questions, ["ok."] * 40)
    seen = []
    m = quality.measure(corpus, embed=lambda t: (seen.append(len(t)), bow_embed(t))[1], max_embed=16,
                        bleu_sample=8, distinct_sample=10)
    assert seen == [16] and m["embedded_questions"] == 16
    assert m["self_bleu_sample"] == 8 and m["distinct_sample"] == 10


# ----------------------------------------------------------------------------- references and the report


def test_reference_questions_of_the_eval_tasks(tmp_path):
    arc = tmp_path / "arc"
    arc.mkdir()
    (arc / "ARC-Easy-Dev.jsonl").write_text(json.dumps({"id": "1", "question": {"stem": "Why is ice cold?",
                                            "choices": []}, "answerKey": "A"}) + "\n")
    ref = reference_questions(["tgsft_general", "tgsft_arc_easy", "hellaswag"], tmp_path)
    assert list(ref) == ["tgsft_general", "arc_easy"]
    assert ref["tgsft_general"] == [q for q, _, _ in GENERAL_ITEMS]
    assert ref["arc_easy"] == ["Why is ice cold?"]
    assert list(reference_questions(["tgsft_arc_easy"], None)) == []  # no data_dir: nothing to read
    with pytest.raises(FileNotFoundError, match="arc_challenge"):
        reference_questions(["tgsft_arc_challenge"], tmp_path)


def test_read_reference_files_and_directories(tmp_path):
    (tmp_path / "q.txt").write_text("First?\n\nSecond?\n")
    assert read_reference(tmp_path / "q.txt") == {"q": ["First?", "Second?"]}
    rows = [{"question": "A?"}, {"goal": "B"}, {"messages": [{"role": "system", "content": "s"},
                                                              {"role": "user", "content": "C?"}]}, "D?"]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_reference(tmp_path / "r.jsonl") == {"r": ["A?", "B", "C?", "D?"]}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"answer": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl: row 1: no question field"):
        read_reference(tmp_path / "bad.jsonl")
    sciq = tmp_path / "data" / "sciq"
    sciq.mkdir(parents=True)
    (sciq / "valid.json").write_text(json.dumps([{"question": "What is H2O?"}]))
    assert read_reference(tmp_path / "data") == {"sciq": ["What is H2O?"]}
    with pytest.raises(FileNotFoundError, match="no known eval file"):
        read_reference(tmp_path / "data" / "sciq")
    with pytest.raises(FileNotFoundError, match="no such reference"):
        read_reference(tmp_path / "missing.txt")


def test_corpus_section_for_the_report(tmp_path):
    assert quality.corpus_section(tmp_path) is None
    q = {"dialogues": 8, "questions": 12, "distinct_2": 0.5, "answer_distinct_2": 0.25, "self_bleu": 12.5,
         "mean_pairwise_cosine": 0.2, "cluster_entropy": 0.9, "near_duplicate_rate": 0.0,
         "complete_sentence_rate": 0.75, "coverage": {"n": 32, "threshold": 0.5, "value": 0.125}}
    (tmp_path / "manifest.json").write_text(json.dumps({"status": "complete", "quality": q}))
    section = quality.corpus_section(tmp_path)
    assert section["rows"][2] == {"metric": "distinct-2 (questions)", "value": 0.5}
    assert section["rows"][-1] == {"metric": "coverage of 32 eval questions (cosine >= 0.5)", "value": 0.125}
    md = quality.corpus_markdown(section)
    assert md[:4] == ["## TG corpus", "", "| metric | value |", "|---|---|"]
    assert "| self-BLEU (questions, 0-100) | 12.5000 |" in md and "| dialogues | 8 |" in md
    assert quality.corpus_markdown(None) == []
