"""Domain loaders: the three row formats in JSONL / JSON / Parquet, and malformed data named by file, row, field."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import DataError, load_examples

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sft"

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def _jsonl(tmp_path: Path, rows: list, name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_messages_jsonl_fixture():
    got = load_examples([FIXTURES / "domain.jsonl"])
    assert len(got.examples) == 8 and got.skipped == 0 and got.rows_read == 8
    assert got.examples[0] == [
        {"role": "user", "content": "Give the capital of France as JSON."},
        {"role": "assistant", "content": '{"country": "France", "capital": "Paris"}'},
    ]


def test_alpaca_json_array_fixture():
    got = load_examples([FIXTURES / "alpaca.json"])
    assert got.examples[0] == [
        {"role": "user", "content": "Name the capital of France."},
        {"role": "assistant", "content": "Paris"},
    ]
    # input is appended to the instruction; system becomes a system message
    assert got.examples[3] == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "Translate to French.\n\nGood morning"},
        {"role": "assistant", "content": "Bonjour"},
    ]


def test_sharegpt_jsonl_fixture():
    got = load_examples([FIXTURES / "sharegpt.jsonl"], fmt="sharegpt")
    assert [m["role"] for m in got.examples[0]] == ["user", "assistant", "user", "assistant"]
    assert got.examples[1][1] == {"role": "assistant", "content": "Rome"}


def test_parquet_messages_and_several_files(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, GOOD]), path)
    got = load_examples([path, FIXTURES / "domain.jsonl"], max_examples=5)
    assert len(got.examples) == 5
    assert got.examples[0] == GOOD["messages"]
    assert got.examples[2][1]["content"].startswith('{"country": "France"')


def test_jsonl_saved_as_json_is_read_line_by_line(tmp_path):
    path = _jsonl(tmp_path, [GOOD, GOOD], name="d.json")
    assert len(load_examples([path]).examples) == 2


# ----------------------------------------------------------------------------- malformed data


def _err(paths, **kw) -> DataError:
    with pytest.raises(DataError) as e:
        load_examples(paths, **kw)
    return e.value


def test_invalid_json_names_line(tmp_path):
    path = _jsonl(tmp_path, [GOOD, GOOD, '{"messages": [}'])
    e = _err([path])
    assert e.path == str(path) and e.row == 3
    assert str(e).startswith(f"{path}: line 3: invalid JSON")


def test_missing_field(tmp_path):
    e = _err([_jsonl(tmp_path, [GOOD, {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}])])
    assert (e.row, e.field) == (2, "messages[0].content")
    assert "line 2: messages[0].content: missing field" in str(e)


def test_missing_format_field_alpaca(tmp_path):
    e = _err([_jsonl(tmp_path, [{"instruction": "Do it", "output": "ok"}, {"instruction": "Do it"}])])
    assert (e.row, e.field) == (2, "output") and "missing field" in str(e)


def test_unknown_role(tmp_path):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}
    e = _err([_jsonl(tmp_path, [row])])
    assert (e.row, e.field) == (1, "messages[1].role")
    assert "unknown role 'bot'" in str(e) and "system, user, assistant" in str(e)


def test_unknown_sharegpt_role(tmp_path):
    row = {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}
    e = _err([_jsonl(tmp_path, [row])])
    assert e.field == "conversations[1].from" and "unknown role 'robot'" in str(e)


def test_empty_content(tmp_path):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "   "}]}
    e = _err([_jsonl(tmp_path, [GOOD, row])])
    assert (e.row, e.field) == (2, "messages[1].content") and "empty content" in str(e)


def test_no_assistant_turn(tmp_path):
    e = _err([_jsonl(tmp_path, [{"messages": [{"role": "user", "content": "a"}]}])])
    assert (e.row, e.field) == (1, "messages") and "no assistant turn" in str(e)


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    e = _err([path])
    assert e.row == 2 and "not valid UTF-8 (byte 0xe9" in str(e)


def test_non_utf8_bytes_in_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "caf\xe9", "output": "b"}\n]')
    e = _err([path])
    assert e.row == 3 and "line 3" in str(e) and "UTF-8" in str(e)


def test_empty_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n  \n")
    e = _err([path], bad_rows="skip")  # file-level: never skipped
    assert e.row is None and str(e) == f"{path}: empty file"


def test_wrong_extension(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n")
    e = _err([path])
    assert "unsupported file type '.csv'" in str(e) and ".jsonl, .json, .parquet" in str(e)


def test_parquet_named_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    pq.write_table(pa.Table.from_pylist([GOOD]), path)
    assert "is a Parquet file but is named .jsonl" in str(_err([path]))


def test_not_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text(json.dumps(GOOD))
    assert "not a readable Parquet file" in str(_err([path]))


def test_non_string_content(tmp_path):
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]},
                        {"role": "assistant", "content": "b"}]}
    e = _err([_jsonl(tmp_path, [row])])
    assert e.field == "messages[0].content" and "must be a string, got list" in str(e)


def test_parquet_row_number(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": None}]),
                   path)
    e = _err([path])
    assert (e.row, e.field) == (2, "output") and str(e) == f"{path}: row 2: output: missing field"
    pq.write_table(pa.table({"instruction": ["a"], "output": [7]}), path)
    assert str(_err([path])) == f"{path}: row 1: output: content must be a string, got int"


def test_row_not_an_object_and_json_not_an_array(tmp_path):
    e = _err([_jsonl(tmp_path, [GOOD, "[1, 2]"])])
    assert e.row == 2 and "must be a JSON object, got list" in str(e)
    path = tmp_path / "obj.json"
    path.write_text(json.dumps(GOOD))
    assert "must hold an array of rows, got dict" in str(_err([path]))


def test_unknown_row_format(tmp_path):
    e = _err([_jsonl(tmp_path, [{"prompt": "a", "completion": "b"}])])
    assert "unknown row format (keys: completion, prompt)" in str(e)


def test_system_message_must_come_first(tmp_path):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                        {"role": "assistant", "content": "b"}]}
    assert _err([_jsonl(tmp_path, [row])]).field == "messages[1].role"


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_examples([tmp_path / "missing.jsonl"])


def test_skip_policy_counts_bad_rows(tmp_path):
    bad_role = {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}
    path = _jsonl(tmp_path, [GOOD, "not json", bad_role, GOOD, {"messages": [{"role": "user", "content": "a"}]}])
    got = load_examples([path], bad_rows="skip")
    assert len(got.examples) == 2 and got.skipped == 3 and got.rows_read == 5
    assert got.problems[0].startswith(f"{path}: line 2: invalid JSON")
    assert "line 3: messages[1].role" in got.problems[1]
    assert got.stats()["skipped"] == 3


def test_skip_policy_still_fails_when_nothing_is_valid(tmp_path):
    path = _jsonl(tmp_path, ["nope", "nope"])
    assert "no valid rows (2 skipped so far)" in str(_err([path], bad_rows="skip"))


def test_sft_modules_import_no_heavy_dependencies():
    import subprocess
    import sys

    code = ("import sys, pipeline.data, pipeline.mix, pipeline.tokenization, pipeline.train, actors.train_worker; "
            "print(sorted(m for m in ('ray', 'torch', 'deepspeed', 'vllm', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
