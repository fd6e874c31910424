"""Mixing: ratio by examples and by tokens, seeding, source tags, repeats, and the held-out slice never mixed in."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.corpus import DIALOGUE_SCHEMA, heldout_ids, write_table
from pipeline.mix import MIX_SCHEMA, build_mix, epoch_order, load_tg, write_mix
from pipeline.schedule import lr_multiplier
from pipeline.train import training_stream


def _domain(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"domain answer {i}"}]
            for i in range(n)]


def _corpus(tmp_path, n: int, *, pt: bool = False):
    rows = []
    for i in range(n):
        msgs = [] if pt else [{"role": "user", "content": f"tg q{i}"},
                              {"role": "assistant", "content": "word " * (1 + i % 5)}]
        rows.append({"dialogue_id": f"d{i:03d}", "messages": msgs, "text": f"tg text {i}" if pt else None,
                     "node_ids": [f"n{i}"], "n_turns": 0 if pt else 1, "n_tokens": 10, "tree": "h"})
    write_table(pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA), tmp_path / "dialogues", shard_rows=7)
    return tmp_path


def _words(messages, text) -> int:
    return sum(len(m["content"].split()) for m in messages) if messages else len((text or "").split())


def test_heldout_dialogues_are_never_mixed(tmp_path):
    corpus = _corpus(tmp_path, 40)
    tg, stats = load_tg(corpus, retention_dialogues=8)
    held = heldout_ids([f"d{i:03d}" for i in range(40)], 8)
    assert stats == {"corpus": str(corpus), "tg_rows_total": 40, "tg_heldout_excluded": 8}
    assert tg.num_rows == 32 and not held & set(tg.column("dialogue_id").to_pylist())
    # Even when the draw has to repeat the corpus, no held-out id appears.
    mix, _ = build_mix(_domain(20), tg, tg_ratio=0.75, seed=3)
    assert not held & set(mix.column("id").to_pylist())


def test_ratio_by_examples_source_tags_and_budget(tmp_path):
    tg, _ = load_tg(_corpus(tmp_path, 100), retention_dialogues=0)
    mix, stats = build_mix(_domain(30), tg, tg_ratio=0.25, seed=0, count_tokens=_words)
    sources = mix.column("source").to_pylist()
    assert mix.schema == MIX_SCHEMA
    assert sources.count("domain") == 30 and sources.count("tg") == 10  # 10 / 40 = 0.25
    domain_ids = {i for i, s in zip(mix.column("id").to_pylist(), sources) if s == "domain"}
    assert domain_ids == {f"domain-{i:06d}" for i in range(30)}  # every domain example exactly once
    assert stats["tg_share_examples"] == 0.25 and stats["tg_repeated"] is False and stats["tg_unique"] == 10
    assert stats["domain_tokens"] == sum(_words(m, None) for m in _domain(30))
    assert sources[:10] != ["domain"] * 10 or sources[-10:] != ["tg"] * 10  # shuffled, not concatenated


def test_ratio_by_tokens(tmp_path):
    tg, _ = load_tg(_corpus(tmp_path, 200), retention_dialogues=0)
    mix, stats = build_mix(_domain(30), tg, tg_ratio=0.5, by="tokens", seed=1, count_tokens=_words)
    assert stats["domain_tokens"] == 30 * 4
    assert abs(stats["tg_tokens"] - stats["domain_tokens"]) <= 3  # within half the longest TG row (6 words)
    assert abs(stats["tg_share_tokens"] - 0.5) < 0.02
    with pytest.raises(ValueError, match="count_tokens"):
        build_mix(_domain(3), tg, tg_ratio=0.5, by="tokens")


def test_too_small_corpus_repeats_rows_and_records_it(tmp_path):
    tg, _ = load_tg(_corpus(tmp_path, 5), retention_dialogues=0)
    mix, stats = build_mix(_domain(10), tg, tg_ratio=0.5, seed=0)
    tg_ids = [i for i, s in zip(mix.column("id").to_pylist(), mix.column("source").to_pylist()) if s == "tg"]
    assert len(tg_ids) == 10 and stats["tg_repeated"] is True and stats["tg_repeats"] == 5
    assert sorted(set(tg_ids)) == [f"d{i:03d}" for i in range(5)]
    assert all(tg_ids.count(i) == 2 for i in set(tg_ids))  # whole passes over the corpus: even repeats


def test_seeded_and_reproducible(tmp_path):
    tg, _ = load_tg(_corpus(tmp_path, 50), retention_dialogues=4)
    a, _ = build_mix(_domain(20), tg, tg_ratio=0.5, seed=7)
    b, _ = build_mix(_domain(20), tg, tg_ratio=0.5, seed=7)
    c, _ = build_mix(_domain(20), tg, tg_ratio=0.5, seed=8)
    assert a.equals(b) and not a.equals(c)


def test_tg_ratio_zero_is_domain_only_and_needs_no_corpus():
    mix, stats = build_mix(_domain(6), None, tg_ratio=0.0, seed=0)
    assert set(mix.column("source").to_pylist()) == {"domain"} and stats["tg_examples"] == 0
    with pytest.raises(ValueError, match="no rows left"):
        build_mix(_domain(6), None, tg_ratio=0.3)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        build_mix(_domain(6), None, tg_ratio=1.0)


def test_tg_pt_rows_carry_text(tmp_path):
    tg, _ = load_tg(_corpus(tmp_path, 10, pt=True), retention_dialogues=0)
    mix, _ = build_mix(_domain(4), tg, tg_ratio=0.5, seed=0)
    for row in mix.to_pylist():
        if row["source"] == "tg":
            assert row["messages"] == [] and row["text"].startswith("tg text")
        else:
            assert row["messages"] and row["text"] is None


def test_epochs_reshuffle_with_seed_plus_epoch():
    o0, o1 = epoch_order(50, seed=3, epoch=0), epoch_order(50, seed=3, epoch=1)
    assert sorted(o0) == list(range(50)) and not np.array_equal(o0, o1)
    assert np.array_equal(o1, epoch_order(50, seed=4, epoch=0))
    mix, _ = build_mix(_domain(8), None, tg_ratio=0.0, seed=3)
    stream = training_stream(mix, epochs=2, seed=3)
    contents = [m[1]["content"] for m in stream.column("messages").to_pylist()]
    assert len(contents) == 16 and sorted(contents[:8]) == sorted(contents[8:]) and contents[:8] != contents[8:]
    # More epochs extend the stream: a run can continue with a larger budget.
    assert training_stream(mix, epochs=3, seed=3).slice(0, 16).equals(stream)


def test_each_epoch_draws_fresh_tg_rows(tmp_path):
    tg, _ = load_tg(_corpus(tmp_path, 50), retention_dialogues=0)
    mix, stats = build_mix(_domain(20), tg, tg_ratio=0.5, seed=2, epochs=2)
    tg_rows = [(r["id"], r["epoch"]) for r in mix.to_pylist() if r["source"] == "tg"]
    per_epoch = [{i for i, e in tg_rows if e == k} for k in (0, 1)]
    assert [len(p) for p in per_epoch] == [20, 20] and not per_epoch[0] & per_epoch[1]  # no row before all are used
    assert all(r["epoch"] is None for r in mix.to_pylist() if r["source"] == "domain")
    assert (stats["tg_examples"], stats["tg_examples_per_epoch"], stats["tg_unique"]) == (40, [20, 20], 40)
    assert stats["tg_max_uses"] == 1 and stats["tg_repeated"] is False and stats["tg_share_examples"] == 0.5
    stream = training_stream(mix, epochs=2, seed=2)
    ids = {m[0]["content"] for m in stream.column("messages").to_pylist()}
    assert len(stream) == 80 and {f"tg q{int(i[1:])}" for i in per_epoch[0] | per_epoch[1]} <= ids
    # Three epochs of a 50-row corpus at 20 rows each: the third epoch starts the corpus again (10 rows twice).
    mix3, stats3 = build_mix(_domain(20), tg, tg_ratio=0.5, seed=2, epochs=3)
    assert (stats3["tg_unique"], stats3["tg_max_uses"], stats3["tg_repeats"]) == (50, 2, 10)
    # More epochs extend the stream of fewer, and epoch 0's mix is the one-epoch mix.
    assert training_stream(mix3, epochs=3, seed=2).slice(0, 80).equals(stream)
    one, _ = build_mix(_domain(20), tg, tg_ratio=0.5, seed=2, epochs=1)
    assert mix.slice(0, 40).equals(one)
    with pytest.raises(ValueError, match="no TG rows for epoch 1"):
        training_stream(one, epochs=2, seed=2)


def test_each_epoch_draws_its_token_budget(tmp_path):
    tg, _ = load_tg(_corpus(tmp_path, 200), retention_dialogues=0)
    mix, stats = build_mix(_domain(30), tg, tg_ratio=0.5, by="tokens", seed=1, epochs=3, count_tokens=_words)
    for e in range(3):
        words = sum(_words(r["messages"], r["text"]) for r in mix.to_pylist() if r["epoch"] == e)
        assert abs(words - 30 * 4) <= 3
    assert abs(stats["tg_share_tokens"] - 0.5) < 0.02 and stats["tg_max_uses"] == 1


def test_write_mix_parquet_and_manifest(tmp_path):
    mix, stats = build_mix(_domain(5), None, tg_ratio=0.0, seed=0)
    out = write_mix(mix, stats, tmp_path / "mix", shard_rows=2)
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 3
    back = pa.concat_tables([pq.read_table(p) for p in parts])
    assert back.equals(mix)
    assert json.loads((out / "manifest.json").read_text())["domain_examples"] == 5


def test_lr_schedules():
    kw = {"total_steps": 10, "warmup_steps": 2}
    assert [lr_multiplier(s, schedule="constant", **kw) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_multiplier(2, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(6, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_multiplier(6, schedule="linear", **kw) == pytest.approx(0.5)
    assert 0 < lr_multiplier(9, schedule="linear", **kw) < lr_multiplier(8, schedule="linear", **kw)
