"""The READMEs and the repository agree: every file or folder a README cites exists, every ``pipeline.x`` /
``actors.x`` name it cites can be found, and every number in a benchmark results table is in a results file that
its section cites."""

from __future__ import annotations

import glob
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
READMES = ["README.md", "benchmarks/README.md", "cluster/README.md"]
EXTENSIONS = (".py", ".md", ".json", ".yaml", ".yml", ".toml", ".png", ".jsonl", ".parquet", ".txt", ".cfg")
NOT_IN_REPO = {"runs", ".venv"}  # outputs and the environment, created by `make`
OUTPUT_NAMES = {"manifest.json", "inspect.json", "inspect.png"}  # files tgsft writes into a run or corpus

_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_NAME = re.compile(r"(?:pipeline|actors)(?:\.\w+)+")


def _expand(token: str) -> list[str]:
    """``results/x.{json,png}`` -> both files."""
    m = re.search(r"\{([^{}]+)\}", token)
    if not m:
        return [token]
    return [p for alt in m.group(1).split(",") for p in _expand(token[: m.start()] + alt + token[m.end():])]


def _is_path(token: str, base: Path) -> bool:
    """A repository path: relative, no spaces, and either a folder path starting at a folder of the repository (or of
    the README's own folder) or a file name with a known extension that is not one of tgsft's outputs."""
    if re.search(r"[\s<>$:=]", token) or token.startswith(("/", "~", ".", "-")):
        return False
    head, sep, _ = token.partition("/")
    if head in NOT_IN_REPO:
        return False
    if sep:
        return (base / head).is_dir() or (REPO / head).is_dir()
    return token.endswith(EXTENSIONS) and token not in OUTPUT_NAMES


def _cited(readme: Path) -> tuple[set[str], set[str]]:
    """(paths, pipeline/actors names) a README cites in code spans, links and code blocks."""
    text = readme.read_text(encoding="utf-8")
    blocks = _FENCE.findall(text)
    prose = _FENCE.sub("", text)
    tokens = set(_CODE_SPAN.findall(prose)) | set(_LINK.findall(prose))
    tokens |= {t.strip("'\",;()") for block in blocks for t in block.split() if "/" in t}
    base = readme.parent
    paths = {p.rstrip("/") for t in tokens if _is_path(t, base) for p in _expand(t)}
    names = {t for t in tokens if _NAME.fullmatch(t)}
    return paths, names


def _exists(path: str, base: Path) -> bool:
    return any(glob.glob(str(root / path)) for root in (base, REPO))


@pytest.mark.parametrize("readme", READMES)
def test_cited_files_exist(readme):
    paths, _ = _cited(REPO / readme)
    assert paths, f"no paths found in {readme}: the extraction is broken"
    assert sorted(p for p in paths if not _exists(p, (REPO / readme).parent)) == []


@pytest.mark.parametrize("readme", READMES)
def test_cited_code_names_exist(readme):
    missing = []
    for name in sorted(_cited(REPO / readme)[1]):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ModuleNotFoundError:
                continue
            for attr in parts[i:]:
                obj = getattr(obj, attr, None)
            if obj is None:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert missing == []


_NUMBER = re.compile(r"(?<![\w.≥≤<>])(?<![≥≤<>] )(\d[\d,]*(?:\.\d+)?)(\s*%)?")  # not targets such as "≥ 0.8"


def _numbers(text: str) -> set[float]:
    return {float(m.group(1).replace(",", "")) for m in _NUMBER.finditer(text)}


def _unbacked_numbers(readme: Path) -> list[str]:
    """Numbers in the tables of each ``## `` section that no results file cited in that section holds (to the
    table's precision; ``74.6 %`` may be stored as 0.746). A ``results/x.png`` citation brings in ``results/x.json``."""
    missing = []
    for section in re.split(r"(?m)^## ", readme.read_text(encoding="utf-8"))[1:]:  # the intro lists scripts
        stems = {re.sub(r"\.\{.*\}$|\.\w+$", "", p) for p in re.findall(r"`(results/[^`]+)`", section)}
        pool = {x for stem in stems for ext in (".json", ".md") if (readme.parent / f"{stem}{ext}").is_file()
                for x in _numbers((readme.parent / f"{stem}{ext}").read_text(encoding="utf-8"))}
        for row in section.splitlines():
            if not row.startswith("|") or set(row) <= set("|-: "):
                continue
            for m in _NUMBER.finditer(row):
                raw = m.group(1).replace(",", "")
                digits = len(raw.partition(".")[2])
                candidates = [(float(raw), digits)] + ([(float(raw) / 100, digits + 2)] if m.group(2) else [])
                if not any(abs(v - x) <= 0.5 * 10**-d + 1e-9 for v, d in candidates for x in pool):
                    missing.append(f"{section.splitlines()[0]}: {m.group(0)} in {row[:60]}")
    return missing


def test_benchmark_table_numbers_come_from_results_files():
    assert _unbacked_numbers(REPO / "benchmarks" / "README.md") == []


def test_unbacked_numbers_on_known_text(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r.json").write_text('{"tokens_per_s": 110.62, "hit_rate": 0.7461, "n": 10002}')
    readme = tmp_path / "README.md"
    readme.write_text("intro | 7 |\n## A\nSee `results/r.png`.\n\n| metric | value | target |\n|---|---|---|\n"
                      "| speed | 110.6 | ≥ 0.8 |\n| hits | 74.6 % | |\n| nodes | 10,002 | |\n| made up | 3.14 | |\n")
    assert _unbacked_numbers(readme) == ["A: 3.14 in | made up | 3.14 | |"]


def test_extraction_on_known_text(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "See `results/a.{json,png}`, [c](cluster/README.md), `runs/local/`, `/mnt/x.json`, `ray.get`, `.txt`,\n"
        "`manifest.json`, `nodes/level_NN/part-0.parquet`, `notes.md` and\n"
        "`pipeline.corpus.read_json`.\n```bash\n.venv/bin/python benchmarks/bench_generate.py --out /tmp/y\n```\n"
    )
    (tmp_path / "results").mkdir()
    paths, names = _cited(readme)
    assert paths == {"results/a.json", "results/a.png", "cluster/README.md", "benchmarks/bench_generate.py",
                     "notes.md"}
    assert names == {"pipeline.corpus.read_json"}
