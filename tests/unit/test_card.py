"""The dataset card: YAML header, license, and that the corpus folder loads as a Hugging Face dataset offline."""

import json

import pandas as pd
import pytest
import yaml

from pipeline import card, quality
from pipeline.config import load_config
from tests.unit.corpora import DISTINCT, bow_embed, node, write_corpus


def _manifest(corpus, **extra):
    tree = load_config(None, overrides=["tree.branching=[5,1]", "tree.max_new_tokens=[48,128]"]).tree
    return {
        "status": "complete", "config_hash": "abc123", "model": "embedded", "model_path": "/cache/smollm2",
        "tree": tree.model_dump(mode="json"), "system_prompt": "You are helpful.", "dialogues": 5,
        "levels": {"1": {"kind": "question", "branching": 5, "max_new_tokens": 48, "generated": 6, "kept": 5,
                         "dropped": {"empty": 1}, "generated_tokens": 41},
                   "2": {"kind": "answer", "branching": 1, "max_new_tokens": 128, "generated": 5, "kept": 5,
                         "dropped": {}, "generated_tokens": 9}},
        "totals": {"generated_tokens": 50, "prompt_tokens": 300},
        "quality": quality.measure(corpus, embed=bow_embed, reference={"self": DISTINCT}),
        **extra,
    }


@pytest.fixture
def corpus(tmp_path):
    path = write_corpus(tmp_path / "corpus", DISTINCT, ["Paris.", "Nectar.", "Light.", "Scattering.", "Snow."],
                       extra_level1=[node(1, 9, "user", "", status="dropped", drop="empty", n_tokens=1)])
    manifest = _manifest(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    card.write_card(path, manifest)
    return path


def _header(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0])


def test_card_header_and_body(corpus):
    text = (corpus / "README.md").read_text()
    head = _header(text)
    assert head["license"] == "apache-2.0"  # the embedded SmolLM2's
    assert head["configs"] == [
        {"config_name": "dialogues", "default": True,
         "data_files": [{"split": "train", "path": "dialogues/part-*.parquet"}]},
        {"config_name": "nodes", "data_files": [{"split": "train", "path": "nodes/level_*/part-*.parquet"}]},
    ]
    assert {"synthetic", "tree-generation", "sft"} <= set(head["tags"])
    assert head["size_categories"] == ["n<1K"] and head["task_categories"] == ["text-generation"]
    assert "# TG corpus of HuggingFaceTB/SmolLM2-135M-Instruct" in text
    assert "branching N_i = [5, 1]" in text and "| 1 | question | 5 | 48 | 6 | 5 | empty: 1 | 41 |" in text
    assert "| distinct-1 / 2 / 3 of questions |" in text and "coverage of 5 reference questions" in text
    assert "## Intended use" in text and "## Limitations" in text


def test_corpus_loads_with_datasets_offline(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    dialogues = datasets.load_dataset(str(corpus), cache_dir=str(tmp_path / "hf"))["train"]
    assert len(dialogues) == 5 and dialogues[0]["messages"][0] == {"role": "user", "content": DISTINCT[0]}
    nodes = datasets.load_dataset(str(corpus), "nodes", cache_dir=str(tmp_path / "hf"))["train"]
    assert len(nodes) == 11 and sorted(set(nodes["level"])) == [1, 2]
    assert sorted(nodes["status"]).count("dropped") == 1


def test_pandas_reads_nodes_without_partitioning_arguments(corpus):
    nodes = pd.read_parquet(corpus / "nodes")
    assert len(nodes) == 11 and list(nodes.columns).count("level") == 1
    assert sorted(nodes.level.unique()) == [1, 2]


def test_license_from_the_model_card(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    assert card.model_license(str(model)) == "unknown"
    (model / "README.md").write_text("---\nlicense: llama3.1\nlanguage: [en]\n---\n# A model\n")
    assert card.model_license(str(model)) == "llama3.1"
    assert card.model_license("some-org/not-in-the-cache") == "unknown"  # the hub is never asked


def test_size_category_and_pt_tags(tmp_path):
    assert [card._size_category(n) for n in (0, 999, 1000, 250_000)] == ["n<1K", "n<1K", "1K<n<10K", "100K<n<1M"]
    path = write_corpus(tmp_path / "c", DISTINCT[:2], ["a.", "b."])
    manifest = _manifest(path)
    manifest["tree"]["mode"] = "pt"
    head = _header(card.render_card(manifest, license_id="mit"))
    assert head["license"] == "mit" and "continued-pretraining" in head["tags"]


def test_push_uploads_card_manifest_and_parquet(corpus, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload", kw))
            return type("Commit", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    (corpus / "README.md").unlink()  # written again before the upload
    url = card.push_corpus(corpus, "me/tg", private=True, log=lambda _: None)
    assert url == "https://hub/commit/1" and (corpus / "README.md").is_file()
    assert calls[0] == ("create", "me/tg", {"repo_type": "dataset", "private": True, "exist_ok": True})
    upload = calls[1][1]
    assert upload["repo_id"] == "me/tg" and upload["repo_type"] == "dataset" and upload["folder_path"] == str(corpus)
    assert upload["allow_patterns"] == ["README.md", "manifest.json", "dialogues/part-*.parquet",
                                        "nodes/level_*/part-*.parquet"]


def test_push_refuses_an_incomplete_corpus(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(FileNotFoundError, match="no complete corpus"):
        card.push_corpus(tmp_path, "me/tg")
