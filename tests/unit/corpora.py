"""Hand-made TG corpora and a toy embedder for the quality and card tests."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa

from pipeline.corpus import DIALOGUE_SCHEMA, NODE_SCHEMA, write_level, write_table

_WORD = re.compile(r"\w+")

DISTINCT = ["What is the capital of France?", "How do bees make honey?", "Explain photosynthesis in plants.",
            "Why does the sky look blue during daytime?", "Write a short poem about winter mornings."]


def bow_embed(texts):
    """Bag-of-words unit vectors over a hashed vocabulary: identical texts embed identically, texts without shared
    words are orthogonal (unless two words collide in the 4096 buckets)."""
    out = np.zeros((len(texts), 4096), np.float32)
    for i, t in enumerate(texts):
        for w in set(_WORD.findall(t.lower())):
            out[i, int.from_bytes(w.encode()[:8].ljust(8, b"_"), "little") % 4096] += 1.0
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def node(level, i, role, text, *, status="kept", finish="stop", drop=None, n_tokens=None):
    return {"node_id": f"{level}-{i}", "parent_id": "root" if level == 1 else f"{level - 1}-{i}", "level": level,
            "branch": 0, "seed": i, "group": f"1-{i}", "role": role, "text": text,
            "n_tokens": n_tokens or len(text.split()), "prompt_tokens": 10, "finish_reason": finish,
            "status": status, "drop_reason": drop}


def write_corpus(path, questions, answers, *, extra_level1=()):
    """A 2-level corpus: question i -> answer i -> one dialogue each; extra_level1 rows are added to level 1."""
    level1 = [node(1, i, "user", q) for i, q in enumerate(questions)] + list(extra_level1)
    level2 = [node(2, i, "assistant", a) for i, a in enumerate(answers)]
    write_level(path, 1, pa.Table.from_pylist(level1, schema=NODE_SCHEMA), shard_rows=100,
                stats={"kept": len(questions)})
    write_level(path, 2, pa.Table.from_pylist(level2, schema=NODE_SCHEMA), shard_rows=100,
                stats={"kept": len(answers)})
    dialogues = [{"dialogue_id": f"2-{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant",
                  "content": a}], "text": None, "node_ids": [f"1-{i}", f"2-{i}"], "n_turns": 1,
                  "n_tokens": len(q.split()) + len(a.split()), "tree": "h"} for i, (q, a) in
                 enumerate(zip(questions, answers))]
    write_table(pa.Table.from_pylist(dialogues, schema=DIALOGUE_SCHEMA), path / "dialogues", shard_rows=100)
    (path / "manifest.json").write_text(json.dumps({"status": "complete"}))
    return path
