"""Pure tree logic: schedule, ids and seeds, expansion, filters, paths."""

from pipeline import tree

MARKERS = ("<|im_start|>", "<|im_end|>")


def test_schedule_alternates_kinds_and_counts():
    layers = tree.schedule([3, 1, 2, 1], [48, 128, 48, 128])
    assert [layer.kind for layer in layers] == ["question", "answer", "question", "answer"]
    assert [layer.level for layer in layers] == [1, 2, 3, 4]
    assert tree.max_nodes([3, 1, 2, 1]) == [3, 3, 6, 6]
    assert {layer.kind for layer in tree.schedule([2, 2], [8, 8], "pt")} == {"text"}


def test_ids_and_seeds_are_deterministic_and_distinct():
    a = tree.expand([{"node_id": tree.ROOT_ID, "group": None}], level=1, branching=4, run_seed=7)
    b = tree.expand([{"node_id": tree.ROOT_ID, "group": None}], level=1, branching=4, run_seed=7)
    c = tree.expand([{"node_id": tree.ROOT_ID, "group": None}], level=1, branching=4, run_seed=8)
    assert a == b
    assert len({r["node_id"] for r in a}) == 4 and len({r["seed"] for r in a}) == 4
    assert {r["node_id"] for r in a}.isdisjoint(r["node_id"] for r in c)
    assert all(0 <= r["seed"] < 2**31 and len(r["node_id"]) == 16 for r in a)
    # Level-1 nodes start their own group; descendants inherit it.
    assert all(r["group"] == r["node_id"] for r in a)
    kids = tree.expand(a[:2], level=2, branching=3, run_seed=7)
    assert [k["group"] for k in kids] == [a[0]["node_id"]] * 3 + [a[1]["node_id"]] * 3
    assert [k["branch"] for k in kids] == [0, 1, 2, 0, 1, 2]
    assert tree.node_id("p", 0, 1) != tree.node_id("p", 1, 1) != tree.node_id("q", 0, 1)


def test_classify_reasons():
    kw = dict(kind="question", markers=MARKERS)
    assert tree.classify("  ", "stop", **kw).drop_reason == tree.EMPTY
    assert tree.classify("What is", "length", truncated="drop", **kw).drop_reason == tree.TRUNCATED
    assert tree.classify("What is", "length", truncated="keep", **kw).status == "kept"
    assert tree.classify("Hi<|im_start|>assistant", "stop", **kw).drop_reason == tree.ROLE_MARKER
    loop = "the cat sat on " * 20
    assert tree.classify(loop, "stop", **kw).drop_reason == tree.REPETITION
    ok = tree.classify("What causes tides on Earth?", "stop", **kw)
    assert (ok.status, ok.drop_reason, ok.text) == ("kept", None, "What causes tides on Earth?")
    # Plain-text layers are continuations: hitting L_i is normal there.
    assert tree.classify("and then", "length", kind="text", markers=MARKERS).status == "kept"


def test_trim_policy_cuts_back_to_a_full_sentence():
    text = "Tides come from the Moon's gravity. The Sun adds a smaller pull. Together they"
    out = tree.classify(text, "length", kind="answer", markers=MARKERS, truncated="trim")
    assert out.status == "kept" and out.text == "Tides come from the Moon's gravity. The Sun adds a smaller pull."
    short = tree.classify("Yes. And then the long tail goes on and on without end", "length",
                          kind="answer", markers=MARKERS, truncated="trim")
    assert short.drop_reason == tree.TRUNCATED  # trimming would keep less than half


def test_mark_duplicates_among_siblings_only():
    rows = [
        {"parent_id": "a", "text": "What is DNA?", "status": "kept"},
        {"parent_id": "a", "text": "what is  DNA?", "status": "kept"},
        {"parent_id": "b", "text": "What is DNA?", "status": "kept"},
        {"parent_id": "a", "text": "What is DNA?", "status": "dropped"},
    ]
    assert tree.mark_duplicates(rows) == [False, True, False, False]


def test_grow_paths_yields_root_to_leaf_dialogues():
    def node(nid, parent, kind, text, status="kept"):
        return {"node_id": nid, "parent_id": parent, "kind": kind, "text": text, "status": status}

    paths = {tree.ROOT_ID: ()}
    paths = tree.grow_paths(paths, [node("q1", "root", "question", "Q1"), node("q2", "root", "question", "Q2", "dropped")])
    paths = tree.grow_paths(paths, [node("a1", "q1", "answer", "A1"), node("a2", "q2", "answer", "A2")])
    assert list(paths) == ["a1"]  # a2's parent was dropped
    paths = tree.grow_paths(paths, [node("q3", "a1", "question", "Q3"), node("q4", "a1", "question", "Q4")])
    paths = tree.grow_paths(paths, [node("a3", "q3", "answer", "A3"), node("a4", "q4", "answer", "A4")])
    assert [[n["node_id"] for n in p] for p in paths.values()] == [["q1", "a1", "q3", "a3"], ["q1", "a1", "q4", "a4"]]
    msgs = tree.path_messages([{"role": "system", "content": "S"}], paths["a4"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in msgs[1:]] == ["Q1", "A1", "Q4", "A4"]


def _grow(branching, seed, drop=lambda level, row: False):
    """A structurally complete corpus: every kept node gets its N_i children; ``drop`` decides which are dropped."""
    levels, parents = [], [{"node_id": tree.ROOT_ID, "group": None}]
    for level, n in enumerate(branching, start=1):
        rows = tree.expand(parents, level=level, branching=n, run_seed=seed)
        for r in rows:
            dropped = drop(level, r)
            r.update(status="dropped" if dropped else "kept", drop_reason="truncated" if dropped else None)
        levels.append(rows)
        parents = [r for r in rows if r["status"] == "kept"]
    return levels


def test_check_levels_accepts_any_complete_corpus_whatever_was_kept():
    for drop in (lambda lv, r: False, lambda lv, r: lv == 1 and r["branch"] == 0, lambda lv, r: r["branch"] == 1):
        levels = _grow([3, 1, 2, 1], 7, drop)
        assert tree.check_levels(levels, branching=[3, 1, 2, 1], run_seed=7) == []


def test_check_levels_finds_each_kind_of_break():
    levels = _grow([3, 1, 2, 1], 7)
    missing = [lv[:] for lv in levels]
    del missing[2][0]  # a lost child of a kept parent: its own child is an orphan one level down
    assert tree.check_levels(missing, branching=[3, 1, 2, 1], run_seed=7) == [
        "level 3: 1 child(ren) of kept parents missing", "level 4: 1 node(s) that are no child of a kept level-3 node"]
    duplicated = [lv[:] for lv in levels]
    duplicated[1].append(dict(duplicated[1][0]))  # the same node written twice (e.g. a retried batch)
    assert tree.check_levels(duplicated, branching=[3, 1, 2, 1], run_seed=7)[0].startswith(
        "level 2: 1 duplicate node id(s)")
    orphaned = _grow([3, 1, 2, 1], 7, lambda lv, r: lv == 1 and r["branch"] == 2)
    orphaned[1] = levels[1]  # children of a dropped question
    assert tree.check_levels(orphaned[:2], branching=[3, 1], run_seed=7) == [
        "level 2: 1 node(s) that are no child of a kept level-1 node"]
    reseeded = [[dict(r) for r in lv] for lv in levels]
    reseeded[0][0]["seed"] += 1
    assert tree.check_levels(reseeded, branching=[3, 1, 2, 1], run_seed=7) == [
        f"level 1: node {reseeded[0][0]['node_id']} has another parent, branch or seed than its id"]
    unexplained = [[dict(r) for r in lv] for lv in levels]
    unexplained[3][0]["status"] = "dropped"
    assert "is 'dropped' with drop reason None" in tree.check_levels(unexplained, branching=[3, 1, 2, 1],
                                                                      run_seed=7)[0]


def test_complete_paths_go_through_kept_nodes_only():
    levels = _grow([2, 1, 2, 1], 3, lambda lv, r: lv == 3 and r["branch"] == 0)
    paths = tree.complete_paths(levels)
    assert len(paths) == 2  # 2 questions x 1 answer x (2 follow-ups - 1 dropped) x 1 answer
    kept = {r["node_id"] for lv in levels for r in lv if r["status"] == "kept"}
    for p in paths:
        assert len(p) == 4 and set(p) <= kept
