"""Tree generation on the embedded model: a real vLLM engine actor behind Ray Data, shared across the module."""

import json
import shutil

import datasets
import pandas as pd
import pytest

from pipeline import chat, tree
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.corpus import frontier_dir, level_dir, read_dialogues, read_json, read_level
from pipeline.generate import generate
from pipeline.tasks.loaders import GENERAL_ITEMS

pytestmark = pytest.mark.integration

BRANCHING = [3, 1, 2, 1]
MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def _cfg(tmp, *extra):
    return load_config(None, overrides=[
        f"output_root={tmp}", "name=t", f"tree.branching={BRANCHING}", "tree.max_new_tokens=[48,128,48,128]",
        "engine.enforce_eager=true", *extra,
    ])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, engines):
    out = tmp_path_factory.mktemp("gen") / "corpus"
    lines = []
    manifest = generate(_cfg(out.parent), out_dir=out, engines=engines, log=lines.append)
    return out, manifest, lines


def test_engine_writes_the_user_question(engines, model_path):
    """P0 + the template's user opener: the model writes a user question, and it stops at the end of the turn."""
    import ray
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    render = chat.renderer(tok)
    fmt = chat.probe(render, special_tokens=tok.all_special_tokens)
    prompt = chat.question_prompt(render, chat.root_messages(None, fmt))
    assert prompt.endswith("<|im_start|>user\n")  # derived, not hard-coded
    out = ray.get(engines[0].generate.remote(
        [prompt] * 4, [1, 2, 3, 4], max_tokens=64, stop=fmt.stops("question"), sampling={"temperature": 1.0}
    ))
    stopped = [t for t, r in zip(out["text"], out["finish_reason"]) if r == "stop"]
    assert stopped, out
    for text in stopped:
        assert text.strip() and not any(m in text for m in MARKERS)
    assert len(set(out["text"])) == 4  # distinct seeds, distinct questions


def test_counts_follow_branching_minus_drops(full_run):
    out, manifest, lines = full_run
    levels = manifest["levels"]
    parents = 1
    for i, n in enumerate(BRANCHING, start=1):
        lv = levels[str(i)]
        assert lv["parents"] == parents and lv["generated"] == parents * n
        assert lv["kept"] == lv["generated"] - sum(lv["dropped"].values())
        parents = lv["kept"]
    assert manifest["dialogues"] == levels["4"]["kept"] > 0
    assert manifest["status"] == "complete" and manifest["totals"]["generated_tokens"] > 0
    assert sum(line.startswith("level ") for line in lines) == 4


def test_nodes_on_disk_match_the_manifest(full_run):
    out, manifest, _ = full_run
    nodes = pd.read_parquet(out / "nodes")
    assert nodes.node_id.is_unique
    for level, lv in manifest["levels"].items():
        on_disk = nodes[nodes.level == int(level)]
        assert len(on_disk) == lv["generated"]
        assert (on_disk.status == "kept").sum() == lv["kept"]
        assert on_disk[on_disk.status == "dropped"].drop_reason.notna().all()
    kept = nodes[nodes.status == "kept"]
    assert not kept.text.str.contains("<\\|im_", regex=True).any()
    assert set(kept.role) == {"user", "assistant"}
    assert (json.loads((level_dir(out, 1) / "_SUCCESS").read_text())["kept"]
            == manifest["levels"]["1"]["kept"])


def test_dialogues_alternate_roles_with_k_turns(full_run):
    out, manifest, _ = full_run
    ds = datasets.load_dataset("parquet", data_files=str(out / "dialogues" / "*.parquet"))["train"]
    assert len(ds) == manifest["dialogues"]
    for row in ds:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system", "user", "assistant", "user", "assistant"]
        assert row["n_turns"] == 2 and len(row["node_ids"]) == 4
        assert all(m["content"].strip() for m in row["messages"])
        assert not any(mk in m["content"] for m in row["messages"] for mk in MARKERS)
    assert ds[0]["messages"][0]["content"].startswith("You are a helpful AI assistant")  # template default P0


def test_resume_after_level_2_reuses_it_and_completes_the_tree(full_run, tmp_path, engines):
    """A crash after level 2 leaves levels 1-2 (nodes and frontiers) complete and nothing else: the rerun reuses them
    as they are and finishes levels 3-4 into a complete tree. Texts below level 2 may differ from the first run's (the engine is not
    batch-invariant), so only what the resume promise fixes is compared with it."""
    out, manifest, _ = full_run
    crashed = tmp_path / "corpus"
    for level in (1, 2):
        shutil.copytree(level_dir(out, level), level_dir(crashed, level))
        shutil.copytree(frontier_dir(out, level), frontier_dir(crashed, level))
    partial = {**manifest, "status": "running", "levels": {k: manifest["levels"][k] for k in ("1", "2")}}
    (crashed / "manifest.json").write_text(json.dumps(partial))
    lines = []
    resumed = generate(_cfg(tmp_path), out_dir=crashed, engines=engines, log=lines.append)
    assert [line for line in lines if line.startswith("level") and "reused" in line] == [
        f"level 1/4 question: reused {manifest['levels']['1']['kept']} kept nodes",
        f"level 2/4 answer: reused {manifest['levels']['2']['kept']} kept nodes",
    ]
    for level in ("1", "2"):
        a, b = manifest["levels"][level], resumed["levels"][level]
        assert (a["generated"], a["kept"], a["dropped"]) == (b["generated"], b["kept"], b["dropped"])
    levels = [read_level(crashed, level)[0].to_pylist() for level in (1, 2, 3, 4)]
    assert tree.check_levels(levels, branching=BRANCHING, run_seed=0) == []
    first_level3 = {r["node_id"] for r in read_level(out, 3)[0].to_pylist()}
    assert {r["node_id"] for r in levels[2]} == first_level3  # children of the same kept level-2 nodes
    dialogue_paths = {tuple(ids) for ids in read_dialogues(crashed).column("node_ids").to_pylist()}
    assert dialogue_paths == tree.complete_paths(levels) and resumed["dialogues"] == len(dialogue_paths)
    again = generate(_cfg(tmp_path), out_dir=crashed, engines=engines, log=lines.append)
    assert again["dialogues"] == resumed["dialogues"] and "reusing the complete corpus" in lines[-1]


def test_another_config_is_refused_unless_overwrite(full_run, engines):
    out, _, _ = full_run
    with pytest.raises(ValueError, match="another config") as e:
        generate(_cfg(out.parent, "tree.seed=5"), out_dir=out, engines=engines)
    assert "--overwrite" in str(e.value)
    assert read_json(out / "manifest.json")["status"] == "complete"  # untouched


@pytest.fixture(scope="module")
def pt_run(tmp_path_factory, engines):
    tmp = tmp_path_factory.mktemp("pt")
    cfg = load_config(None, overrides=[
        f"output_root={tmp}", "tree.mode=pt", "tree.branching=[2,2]", "tree.max_new_tokens=[24,24]",
    ])
    return tmp / "pt", generate(cfg, out_dir=tmp / "pt", engines=engines, log=lambda _: None)


def test_tg_pt_writes_plain_text(pt_run):
    out, manifest = pt_run
    ds = datasets.load_dataset("parquet", data_files=str(out / "dialogues" / "*.parquet"))["train"]
    assert len(ds) == manifest["dialogues"] >= 1
    assert all(row["text"] and row["messages"] == [] for row in ds)
    nodes = pd.read_parquet(out / "nodes")
    assert set(nodes.role) == {"text"}


def test_manifest_has_quality_and_the_card_loads_as_a_dataset(full_run, tmp_path):
    out, manifest, lines = full_run
    q = read_json(out / "manifest.json")["quality"]
    assert q["questions"] == manifest["levels"]["1"]["kept"] + manifest["levels"]["3"]["kept"]
    assert 0 < q["distinct_2"] <= 1 and 0 <= q["self_bleu"] <= 100
    assert -1 <= q["mean_pairwise_cosine"] < 1 and 0 <= q["cluster_entropy"] <= 1
    assert q["coverage"]["n"] == len(GENERAL_ITEMS) and 0 <= q["coverage"]["value"] <= 1  # the default eval task
    assert q["embedded_questions"] == q["questions"]
    assert any(line.startswith("quality: distinct-2 ") for line in lines)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n")
    dialogues = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf"))["train"]
    assert len(dialogues) == manifest["dialogues"]
    nodes = datasets.load_dataset(str(out), "nodes", cache_dir=str(tmp_path / "hf"))["train"]
    assert len(nodes) == manifest["totals"]["generated"]


def test_inspect_compares_two_corpora(full_run, pt_run, tmp_path, capsys):
    sft, _, _ = full_run
    pt, _ = pt_run
    assert main(["inspect", str(sft), "--compare", str(pt), "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| metric" in table and "| corpus" in table and "| pt" in table and "| coverage" in table
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert list(report["corpora"]) == ["corpus", "pt"]
    assert report["reference"] == {"tgsft_general": len(GENERAL_ITEMS)}
    a, b = report["corpora"]["corpus"]["quality"], report["corpora"]["pt"]["quality"]
    stored = read_json(sft / "manifest.json")["quality"]
    for key in ("distinct_1", "distinct_2", "distinct_3", "self_bleu", "complete_sentence_rate", "levels"):
        assert a[key] == stored[key]  # the same corpus measured twice: text metrics are exact
    assert a["mean_pairwise_cosine"] == pytest.approx(stored["mean_pairwise_cosine"], abs=1e-4)
    assert a["coverage"]["value"] == pytest.approx(stored["coverage"]["value"], abs=0.04)
    assert b["answers"] == 0 and b["questions"] > 0 and b["lengths"]["answer"] is None
    assert (tmp_path / "inspect.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dedup_drops_injected_near_duplicates():
    """The shipped sentence embedder + the dedup pass: paraphrases go, distinct questions stay."""
    from actors.embedder import Embedder
    from pipeline.dedup import dedup_mask
    from pipeline.model import embedder_path

    questions = [
        "How do I bake sourdough bread at home?",
        "What is the capital city of Australia?",
        "How can I bake sourdough bread at home?",  # paraphrase of 0
        "Explain how vaccines train the immune system.",
        "What's the capital city of Australia?",  # paraphrase of 1
        "Write a haiku about autumn leaves.",
    ]
    emb = Embedder(embedder_path()).embed(questions)
    keep = dedup_mask(emb, threshold=0.9)
    assert keep.tolist() == [True, True, False, True, False, True]
    # Against an earlier level: a question already kept there is dropped here.
    keep_next = dedup_mask(Embedder(embedder_path()).embed(["How do you bake sourdough bread at home?"]), emb[keep],
                           threshold=0.9)
    assert keep_next.tolist() == [False]
