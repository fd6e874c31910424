"""The TG corpus on disk: Parquet schemas, atomic writes, the manifest, per-level completion markers, and the
held-out slice of dialogues kept for the retention probe.

Layout of a corpus directory::

    manifest.json                      config hash, model, per-level counts, tokens, timings, quality metrics
    nodes/level_01/part-00000.parquet  every generated node (kept and dropped), NODE_SCHEMA
    nodes/level_01/_SUCCESS            the level is complete (JSON: counts)
    frontier/level_01/part-*.parquet   the level's kept nodes with their root-to-node paths, FRONTIER_SCHEMA (what
                                       the next level and the dialogues are made from)
    dialogues/part-00000.parquet       one row per root-to-leaf path, DIALOGUE_SCHEMA
    README.md                          dataset card (see :mod:`pipeline.card`)
    inspect.json, inspect.png          written by ``tgsft inspect`` (default output directory)

Level folders are ``level_NN``, not Hive-style ``level=NN``: the rows carry ``level`` themselves, and a Hive folder
name would make pandas / pyarrow derive a second, conflicting ``level`` column from the path.

Every file is written under a temporary name and renamed, so a crash never leaves a file that looks complete, and a
level directory exists only once all of its parts are written. Levels, frontiers and dialogues are written by Ray
Data from the workers (:func:`write_dataset`); their rows never pass through the driver.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "DIALOGUE_FILES",
    "DIALOGUE_SCHEMA",
    "FRONTIER_SCHEMA",
    "LEVEL_SCHEMA",
    "MESSAGE_TYPE",
    "NODE_FILES",
    "NODE_SCHEMA",
    "PATH_TYPE",
    "atomic_write_bytes",
    "atomic_write_figure",
    "atomic_write_text",
    "frontier_dir",
    "heldout_ids",
    "level_dir",
    "read_dataset",
    "read_dialogues",
    "read_json",
    "read_level",
    "read_nodes",
    "write_dataset",
    "write_level",
    "write_table",
]

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

NODE_SCHEMA = pa.schema(
    [
        ("node_id", pa.string()),
        ("parent_id", pa.string()),
        ("level", pa.int16()),
        ("branch", pa.int32()),
        ("seed", pa.int64()),
        ("group", pa.string()),  # level-1 ancestor: whole subtrees go to one engine
        ("role", pa.string()),  # "user" | "assistant" | "text"
        ("text", pa.string()),
        ("n_tokens", pa.int32()),
        ("prompt_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("status", pa.string()),  # "kept" | "dropped"
        ("drop_reason", pa.string()),  # null when kept
    ]
)

# A root-to-node path: the ancestors' and the node's own id, kind ("question" | "answer" | "text"), text, tokens.
PATH_TYPE = pa.list_(pa.struct([("node_id", pa.string()), ("kind", pa.string()), ("text", pa.string()),
                                ("n_tokens", pa.int32())]))

# A level's rows while it is made: the node columns plus the path of each kept node (null when dropped).
LEVEL_SCHEMA = NODE_SCHEMA.append(pa.field("path", PATH_TYPE))

FRONTIER_SCHEMA = pa.schema([("node_id", pa.string()), ("group", pa.string()), ("path", PATH_TYPE)])

DIALOGUE_SCHEMA = pa.schema(
    [
        ("dialogue_id", pa.string()),  # = leaf node id
        ("messages", pa.list_(MESSAGE_TYPE)),  # Hugging Face chat format (sft); empty for pt
        ("text", pa.string()),  # plain text (pt); null for sft
        ("node_ids", pa.list_(pa.string())),  # root-to-leaf path, level 1 first
        ("n_turns", pa.int16()),
        ("n_tokens", pa.int32()),  # generated tokens along the path
        ("tree", pa.string()),  # config hash of the tree that made it
    ]
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _located(e: OSError, path: Path) -> OSError:
    """``e`` naming ``path`` when the OS did not name a file (a failed write, e.g. a full disk)."""
    if e.filename:
        return e
    return OSError(e.errno, e.strerror or str(e), str(path))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename.

    Raises:
        OSError: naming ``path`` (permissions, a full disk); no temporary file is left behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any written file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _located(e, path) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_figure(fig: Any, path: Path, *, dpi: int = 110) -> None:
    """Render a matplotlib figure to PNG, close it, and write it with :func:`atomic_write_bytes`."""
    import io

    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, or None if it does not exist."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def _write_parts(table: pa.Table, directory: Path, shard_rows: int) -> list[str]:
    names = []
    for i, start in enumerate(range(0, max(table.num_rows, 1), shard_rows)):
        name = f"part-{i:05d}.parquet"
        pq.write_table(table.slice(start, shard_rows), directory / name, compression="zstd")
        names.append(name)
    return names


def write_table(table: pa.Table, directory: Path, *, shard_rows: int, marker: dict | None = None) -> None:
    """Write ``table`` as ``part-*.parquet`` shards into ``directory``, replacing it atomically.

    The shards (and an optional ``_SUCCESS`` marker holding ``marker``) are written into a temporary sibling
    directory that is renamed into place last.

    Raises:
        OSError: naming ``directory`` (permissions, a full disk); the temporary directory is removed.
    """
    _replace_folder(directory, lambda tmp: _write_parts(table, tmp, shard_rows), marker)


def _replace_folder(directory: Path, fill: Callable[[Path], list[str]], marker: dict | None) -> list[str]:
    """Fill a temporary sibling of ``directory`` (``fill`` returns the part names it wrote), add the ``_SUCCESS``
    marker, and rename it into place, replacing ``directory``; returns the part names.

    Raises:
        OSError: naming ``directory``; the temporary directory is removed.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        parts = fill(tmp)
        if marker is not None:
            (tmp / "_SUCCESS").write_text(json.dumps({**marker, "parts": parts}, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except OSError as e:
        raise _located(e, directory) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return parts


# Glob patterns of the Parquet parts, relative to a corpus directory (for dataset cards and uploads).
NODE_FILES = "nodes/level_*/part-*.parquet"
DIALOGUE_FILES = "dialogues/part-*.parquet"


def level_dir(out_dir: Path, level: int) -> Path:
    """The folder of one level's node parts (``<out_dir>/nodes/level_NN``)."""
    return Path(out_dir) / "nodes" / f"level_{level:02d}"


def frontier_dir(out_dir: Path, level: int) -> Path:
    """The folder of one level's frontier (``<out_dir>/frontier/level_NN``)."""
    return Path(out_dir) / "frontier" / f"level_{level:02d}"


def write_dataset(ds: Any, directory: Path, *, schema: pa.Schema, shard_rows: int, marker: dict | None = None) -> int:
    """Write a Ray Dataset as ``part-*.parquet`` shards into ``directory`` from the workers, replacing it atomically
    (as :func:`write_table`: a temporary sibling renamed into place last, with the optional ``_SUCCESS`` marker).

    Returns:
        The number of parts written (an empty dataset gets one empty part, so the folder always reads).

    Raises:
        OSError: naming ``directory``; the temporary directory is removed.
    """

    def fill(tmp: Path) -> list[str]:
        ds.select_columns(schema.names).write_parquet(str(tmp), max_rows_per_file=shard_rows, compression="zstd")
        written = sorted(p for p in tmp.iterdir() if p.suffix == ".parquet")
        parts = [f"part-{i:05d}.parquet" for i in range(len(written))]
        for path, name in zip(written, parts):
            path.rename(tmp / name)
        if not parts:
            parts = ["part-00000.parquet"]
            pq.write_table(schema.empty_table(), tmp / parts[0], compression="zstd")
        return parts

    return len(_replace_folder(directory, fill, marker))


def read_dataset(directory: Path, *, schema: pa.Schema) -> Any:
    """A folder written by :func:`write_dataset` as a Ray Dataset, one block per part, each read by a Ray task: the
    driver handles file names only. (``ray.data.read_parquet`` does the same, but its file listing took 3.5-9 s per
    call on a 2-core machine, more than a small level's whole work.)"""
    import ray

    parts = (read_json(directory / "_SUCCESS") or {}).get("parts") or sorted(
        p.name for p in directory.glob("*.parquet"))
    read = ray.remote(_read_part).options(num_cpus=0.25)
    return ray.data.from_arrow_refs([read.remote(str(directory / p), schema) for p in parts])


def _read_part(path: str, schema: pa.Schema) -> pa.Table:
    return pq.read_table(path, schema=schema)


def write_level(out_dir: Path, level: int, table: pa.Table, *, shard_rows: int, stats: dict) -> None:
    """Write one complete level with its ``_SUCCESS`` marker (the resume point)."""
    write_table(table.cast(NODE_SCHEMA), level_dir(out_dir, level), shard_rows=shard_rows, marker=stats)


def read_level(out_dir: Path, level: int) -> tuple[pa.Table, dict] | None:
    """A completed level's nodes and marker, or None when the level is not complete."""
    d = level_dir(out_dir, level)
    marker = read_json(d / "_SUCCESS")
    if marker is None:
        return None
    table = pa.concat_tables([pq.read_table(d / p, schema=NODE_SCHEMA) for p in marker["parts"]])
    return table, marker


def read_nodes(corpus_dir: Path) -> pa.Table:
    """Every node of the completed levels of a corpus, level 1 first.

    Raises:
        FileNotFoundError: the corpus has no completed level.
    """
    tables, level = [], 1
    while (done := read_level(corpus_dir, level)) is not None:
        tables.append(done[0])
        level += 1
    if not tables:
        raise FileNotFoundError(f"{level_dir(corpus_dir, 1)}: no completed level; run `tgsft generate` first")
    return pa.concat_tables(tables)


def read_dialogues(corpus_dir: Path) -> pa.Table:
    """All dialogue rows of a corpus directory."""
    d = Path(corpus_dir) / "dialogues"
    files = sorted(d.glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{d}: no dialogue parts; run `tgsft generate` first")
    return pa.concat_tables([pq.read_table(f, schema=DIALOGUE_SCHEMA) for f in files])


def heldout_ids(dialogue_ids: Iterable[str], n: int) -> set[str]:
    """The ``n`` dialogues reserved for the retention probe: never mixed into training.

    Chosen by a hash of the id, so the choice is stable, independent of row order, and spread over the tree.
    """
    ranked = sorted(dialogue_ids, key=lambda i: hashlib.blake2b(f"heldout:{i}".encode(), digest_size=8).digest())
    return set(ranked[:n])
