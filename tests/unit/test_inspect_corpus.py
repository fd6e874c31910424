"""``tgsft inspect`` on two hand-made corpora, with a toy embedder in place of all-MiniLM-L6-v2."""

import json

import pytest

from pipeline import quality
from pipeline.cli import main
from pipeline.tasks.loaders import GENERAL_ITEMS
from tests.unit.corpora import DISTINCT, bow_embed, write_corpus


@pytest.fixture
def two_corpora(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "local_embedder", lambda *a, **k: bow_embed)
    varied = write_corpus(tmp_path / "varied", DISTINCT, ["Paris.", "Nectar.", "Light.", "Rayleigh.", "Snow."])
    same = write_corpus(tmp_path / "same", [DISTINCT[0]] * 5, ["Paris."] * 5)
    return varied, same


def test_inspect_compare_writes_json_png_and_a_table(two_corpora, tmp_path, capsys):
    varied, same = two_corpora
    ref = tmp_path / "ref.txt"
    ref.write_text(f"{DISTINCT[0]}\n{DISTINCT[1]}\n")
    assert main(["inspect", str(varied), "--compare", str(same), "--reference", str(ref), "--out",
                 str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in out[0].split("|")[1:4]] == ["metric", "varied", "same"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]] for line in out if "|" in line}
    assert rows["coverage"] == ["1.0000", "0.5000"]  # the same corpus covers only the first reference question
    assert rows["mean pairwise cosine"][1] == "1.0000"
    assert rows["self-BLEU questions (0-100)"][1] == "100.00"
    report = json.loads((tmp_path / "out" / "inspect.json").read_text())
    assert report["reference"] == {"ref": 2} and report["threshold"] == 0.5
    assert report["corpora"]["varied"]["path"] == str(varied)
    assert report["corpora"]["same"]["quality"]["distinct_2"] == pytest.approx(1 / 5)
    assert (tmp_path / "out" / "inspect.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_defaults_to_the_corpus_dir_and_tgsft_general(two_corpora, capsys):
    varied, _ = two_corpora
    assert main(["inspect", str(varied), "--threshold", "0.9"]) == 0
    report = json.loads((varied / "inspect.json").read_text())
    n = len(GENERAL_ITEMS)
    assert report["reference"] == {"tgsft_general": n} and report["threshold"] == 0.9
    # "What is the capital of France?" is both a corpus and a tgsft_general question
    assert report["corpora"]["varied"]["quality"]["coverage"]["by_source"]["tgsft_general"]["value"] == 1 / n


def test_inspect_names_a_missing_corpus(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quality, "local_embedder", lambda *a, **k: None)
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    assert "level_01: no completed level; run `tgsft generate` first" in capsys.readouterr().err
