"""Domain data loaders: chat files in, validated message lists out.

Reads the files listed in ``data.train`` (JSONL, a JSON array, or Parquet) in one of three row formats and turns
every row into a Hugging Face / OpenAI ``messages`` list (``[{"role": ..., "content": ...}, ...]``):

- ``messages``: ``{"messages": [{"role": "user", "content": "..."}, ...]}``
- ``alpaca``:   ``{"instruction": "...", "input": "...", "output": "...", "system": "..."}`` (input, system optional)
- ``sharegpt``: ``{"conversations": [{"from": "human", "value": "..."}, ...], "system": "..."}``

Writes nothing. Every problem is a :class:`DataError` naming the file, the row (the 1-based line for JSONL, the
1-based element / row otherwise) and the field, e.g. ``train.jsonl: line 3: messages[1].role: unknown role 'bot'``.
With ``bad_rows="skip"`` a bad row is counted and skipped instead; file-level problems (missing file, unsupported
extension, empty file, unreadable JSON array or Parquet) always raise, and so does a file with no valid row.

Roles are ``system`` (first message only), ``user`` and ``assistant``; content must be a non-empty string (text
parts lists are rejected: the trainer is text-only); each row needs at least one assistant turn. Length needs the
tokenizer, so the trainer checks it (:func:`pipeline.train.train`): a row with no assistant token within
``train.max_seq_len`` is a bad row (named by file and row like the others); a longer row that still trains is
truncated and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

__all__ = ["DataError", "DomainSet", "load_examples"]

Format = Literal["auto", "messages", "alpaca", "sharegpt"]
_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}
_EXTENSIONS = (".jsonl", ".json", ".parquet")
_MAX_PROBLEMS = 20  # problem messages kept (for the manifest and logs) when bad rows are skipped


class DataError(ValueError):
    """A domain file or row is malformed.

    Attributes:
        path: the file.
        row: 1-based line (JSONL) or row / element number, None for file-level problems.
        field: the offending field path (``messages[2].content``), None when not about one field.
    """

    def __init__(self, path: str | Path, message: str, *, row: int | None = None, field: str | None = None,
                 line: bool = False):
        self.path, self.row, self.field = str(path), row, field
        where = [self.path]
        if row is not None:
            where.append(f"{'line' if line else 'row'} {row}")
        if field:
            where.append(field)
        super().__init__(f"{': '.join(where)}: {message}")


class _RowError(ValueError):
    """A row-level problem; the loader adds file and row to make it a :class:`DataError`."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class DomainSet:
    """Validated domain examples and what loading them skipped."""

    examples: list[list[dict[str, str]]]
    files: list[str]
    rows_read: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # the first few skipped rows' messages
    origins: list[tuple[str, int, bool]] = field(default_factory=list)  # (file, row, row is a line) per example

    def row_error(self, i: int, field_name: str | None, message: str) -> DataError:
        """A :class:`DataError` about example ``i``, located at its file and row."""
        path, row, line = self.origins[i]
        return DataError(path, message, row=row, field=field_name, line=line)

    def drop(self, bad: dict[int, DataError]) -> None:
        """Remove the examples ``bad`` maps to their problems, counting them as skipped rows."""
        keep = [i for i in range(len(self.examples)) if i not in bad]
        self.examples = [self.examples[i] for i in keep]
        self.origins = [self.origins[i] for i in keep]
        self.skipped += len(bad)
        self.problems += [str(e) for e in list(bad.values())[: max(0, _MAX_PROBLEMS - len(self.problems))]]

    def stats(self) -> dict[str, Any]:
        """JSON-ready counts for a manifest."""
        return {
            "files": self.files,
            "rows_read": self.rows_read,
            "examples": len(self.examples),
            "skipped": self.skipped,
            "problems": self.problems,
        }


# ----------------------------------------------------------------------------- row normalisation


def _text(value: Any, name: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _RowError(name, f"content must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _RowError(name, "empty content")
    return value


def _check_dialogue(messages: list[dict[str, str]], field_name: str) -> list[dict[str, str]]:
    if not messages:
        raise _RowError(field_name, "no messages")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise _RowError(f"{field_name}[{i}].role", "a system message may only come first")
    if not any(m["role"] == "assistant" for m in messages):
        raise _RowError(field_name, "no assistant turn (nothing to train on)")
    return messages


def _from_messages(row: dict) -> list[dict[str, str]]:
    if "messages" not in row:
        raise _RowError("messages", "missing field")
    msgs = row["messages"]
    if not isinstance(msgs, list):
        raise _RowError("messages", f"must be a list of {{role, content}} objects, got {type(msgs).__name__}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _RowError(f"messages[{i}]", f"must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if m.get(key) is None:
                raise _RowError(f"messages[{i}].{key}", "missing field")
        role = m["role"]
        if role not in _ROLES:
            raise _RowError(f"messages[{i}].role", f"unknown role {role!r} (allowed: {', '.join(_ROLES)})")
        out.append({"role": role, "content": _text(m["content"], f"messages[{i}].content")})
    return _check_dialogue(out, "messages")


def _from_alpaca(row: dict) -> list[dict[str, str]]:
    for key in ("instruction", "output"):
        if row.get(key) is None:
            raise _RowError(key, "missing field")
    instruction = _text(row["instruction"], "instruction")
    extra = row.get("input")
    extra = "" if extra is None else _text(extra, "input", allow_empty=True)
    out = []
    if row.get("system") is not None:
        out.append({"role": "system", "content": _text(row["system"], "system")})
    out.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction})
    out.append({"role": "assistant", "content": _text(row["output"], "output")})
    return out


def _from_sharegpt(row: dict) -> list[dict[str, str]]:
    if "conversations" not in row:
        raise _RowError("conversations", "missing field")
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise _RowError("conversations", f"must be a list of {{from, value}} objects, got {type(turns).__name__}")
    out = []
    if row.get("system") is not None:
        out.append({"role": "system", "content": _text(row["system"], "system")})
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise _RowError(f"conversations[{i}]", f"must be an object, got {type(t).__name__}")
        for key in ("from", "value"):
            if t.get(key) is None:
                raise _RowError(f"conversations[{i}].{key}", "missing field")
        role = _SHAREGPT_ROLES.get(t["from"]) if isinstance(t["from"], str) else None
        if role is None:
            allowed = ", ".join(_SHAREGPT_ROLES)
            raise _RowError(f"conversations[{i}].from", f"unknown role {t['from']!r} (allowed: {allowed})")
        out.append({"role": role, "content": _text(t["value"], f"conversations[{i}].value")})
    return _check_dialogue(out, "conversations")


_NORMALIZERS = {"messages": _from_messages, "alpaca": _from_alpaca, "sharegpt": _from_sharegpt}


def _detect(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    return None


# ----------------------------------------------------------------------------- file readers


def _jsonl_rows(path: Path, data: bytes) -> Iterator[tuple[int, Any]]:
    """(line number, row or _RowError) for each non-blank line."""
    for n, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield n, _RowError(None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
            continue
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            yield n, _RowError(None, f"invalid JSON: {e.msg} at column {e.colno}")


def _json_rows(path: Path, data: bytes) -> Iterator[tuple[int, Any]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(path, f"not valid UTF-8 (byte 0x{data[e.start]:02x})", row=line, line=True) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line saved as .json: read it as JSONL
            yield from _jsonl_rows(path, data)
            return
        raise DataError(path, f"invalid JSON: {e.msg} at column {e.colno}", row=e.lineno, line=True) from None
    if not isinstance(rows, list):
        raise DataError(path, f"a .json file must hold an array of rows, got {type(rows).__name__}")
    yield from enumerate(rows, start=1)


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(path, f"not a readable Parquet file ({e})") from None
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def _rows(path: Path) -> tuple[Iterator[tuple[int, Any]], bool]:
    """Row iterator of one file and whether rows are numbered by line."""
    ext = path.suffix.lower()
    if ext not in _EXTENSIONS:
        raise DataError(path, f"unsupported file type {ext or '(no extension)'!r}; expected {', '.join(_EXTENSIONS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: domain data file not found")
    if ext == ".parquet":
        return _parquet_rows(path), False
    data = path.read_bytes()
    if not data.strip():
        raise DataError(path, "empty file")
    if data.startswith(b"PAR1"):
        raise DataError(path, f"this is a Parquet file but is named {ext}; rename it to .parquet")
    if ext == ".jsonl":
        return _jsonl_rows(path, data), True
    return _json_rows(path, data), True


def _load_file(path: Path, *, fmt: Format, bad_rows: str, out: DomainSet, limit: int | None) -> None:
    rows, by_line = _rows(path)
    detected = None if fmt == "auto" else fmt
    kept = 0
    for n, row in rows:
        if limit is not None and len(out.examples) >= limit:
            return
        out.rows_read += 1
        try:
            if isinstance(row, _RowError):
                raise row
            if detected is None:
                if not isinstance(row, dict):
                    raise _RowError(None, f"a row must be a JSON object, got {type(row).__name__}")
                detected = _detect(row)
                if detected is None:
                    keys = ", ".join(sorted(row)) or "none"
                    raise _RowError(
                        None,
                        f"unknown row format (keys: {keys}); expected 'messages', 'conversations' (ShareGPT) or "
                        "'instruction'/'output' (Alpaca)",
                    )
            if not isinstance(row, dict):
                raise _RowError(None, f"a row must be a JSON object, got {type(row).__name__}")
            out.examples.append(_NORMALIZERS[detected](row))
            out.origins.append((str(path), n, by_line))
            kept += 1
        except _RowError as e:
            err = DataError(path, str(e), row=n, field=e.field, line=by_line)
            if bad_rows != "skip":
                raise err from None
            out.skipped += 1
            if len(out.problems) < _MAX_PROBLEMS:
                out.problems.append(str(err))
    if kept == 0:
        raise DataError(path, "no valid rows" + (f" ({out.skipped} skipped so far)" if out.skipped else ""))


def load_examples(
    paths: Sequence[str | Path],
    *,
    fmt: Format = "auto",
    bad_rows: Literal["error", "skip"] = "error",
    max_examples: int | None = None,
) -> DomainSet:
    """Load and validate domain chat examples from JSONL / JSON / Parquet files.

    Args:
        paths: files, read in order.
        fmt: row format, or ``auto`` to detect it per file from the first row's keys.
        bad_rows: ``error`` stops at the first malformed row; ``skip`` skips and counts malformed rows.
        max_examples: stop after this many valid examples (None: all).

    Returns:
        The :class:`DomainSet` (examples in file order, counts, the first skipped rows' messages).

    Raises:
        DataError: a malformed file, or a malformed row when ``bad_rows="error"`` (names file, row, field).
        FileNotFoundError: a listed file does not exist.
    """
    if not paths:
        raise ValueError("no domain data files given")
    out = DomainSet(examples=[], files=[str(p) for p in paths])
    for p in paths:
        if max_examples is not None and len(out.examples) >= max_examples:
            break
        _load_file(Path(p), fmt=fmt, bad_rows=bad_rows, out=out, limit=max_examples)
    return out
