"""The bad-input catalogue, through the ``tgsft`` command line: every case must exit non-zero with a message that
names the file / row / field or config key, and leave nothing half-written. No Ray, engine or endpoint is started:
``tgsft run`` checks config, domain files, eval tasks and the run directory before it writes or starts anything.
(The endpoint's own answers to bad requests are in tests/integration/test_serve_eval.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.generate import check_output
from pipeline.serve import free_port

REPO = Path(__file__).resolve().parents[2]
GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def _tgsft(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse and --model parsing exit directly
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    return code, capsys.readouterr().err


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def out(tmp_path) -> Path:
    """The output root every case writes under (must stay empty)."""
    return tmp_path / "runs"


def _run(capsys, out: Path, *overrides: str, config: Path | None = None) -> tuple[int, str]:
    args = ["run"] + ([str(config)] if config else []) + ["-o", f"output_root={out}"]
    for o in overrides:
        args += ["-o", o]
    return _tgsft(capsys, *args)


# ----------------------------------------------------------------------------- config (exit 2, key named)

CONFIG_CASES = {
    "negative N_i": (["tree.branching=[2,-1]", "tree.max_new_tokens=[8,8]"], "every N_i must be >= 1"),
    "zero N_i": (["tree.branching=[0,1]", "tree.max_new_tokens=[8,8]"], "every N_i must be >= 1"),
    "L_i list of the wrong length": (["tree.branching=[2,1]", "tree.max_new_tokens=[8]"],
                                     "max_new_tokens has 1 entries"),
    "unknown key": (["train.learning_rate=0.1"], "train.learning_rate: unknown key"),
    "ratio above 1": (["mix.tg_ratio=1.5"], "mix.tg_ratio: Input should be less than 1 (got 1.5)"),
    "ratio below 0": (["mix.tg_ratio=-0.2"], "mix.tg_ratio: Input should be greater than or equal to 0 (got -0.2)"),
    "missing model path": (["model.source=/nonexistent/model"],
                           "model.source: /nonexistent/model is not a Hugging Face model folder (no config.json"),
    "ZeRO stage 4": (["train.zero_stage=4"], "train.zero_stage"),
    "fp16 on CPU": (["train.precision=fp16"], "train.precision: fp16 needs GPUs (train.use_gpu: true)"),
    "override without a value": (["tree.branching"], "override 'tree.branching': expected key.path=value"),
}


@pytest.mark.parametrize("overrides,needle", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_config_cases(capsys, out, overrides, needle):
    code, err = _run(capsys, out, *overrides)
    assert code == 2 and needle in err, err
    assert not out.exists()


def test_config_file_unknown_key_names_file_and_key(capsys, out, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tree:\n  preset: balance\n  brnaching: [2, 1]\n")
    code, err = _run(capsys, out, config=path)
    assert code == 2 and f"{path}: 1 invalid setting(s)" in err and "tree.brnaching: unknown key" in err


def test_config_file_bad_yaml_and_missing_file(capsys, out, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tree: [1, 2\n")
    code, err = _run(capsys, out, config=path)
    assert code == 2 and f"{path}: not valid YAML" in err
    code, err = _run(capsys, out, config=tmp_path / "nope.yaml")
    assert code == 2 and f"{tmp_path / 'nope.yaml'}: cannot read config: No such file or directory" in err


def test_unwritable_output_dir(capsys, tmp_path):
    # /sys refuses new entries even to root (EPERM; EACCES for other users), reported plainly with its path
    code, err = _run(capsys, Path("/sys/tgsft-test"))
    assert code == 1 and err.startswith("tgsft: error: /sys/tgsft-test"), err
    assert "operation not permitted" in err.lower() or "permission denied" in err.lower(), err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _run(capsys, blocker / "runs")
    assert code == 1 and f"{blocker}" in err and "Not a directory" in err, err


def test_existing_output_with_another_config(capsys, out):
    corpus = out / "tgsft" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "manifest.json").write_text(json.dumps({"config_hash": "0123456789abcdef", "status": "complete"}))
    before = _files(out)
    code, err = _run(capsys, out)
    assert code == 1 and f"{corpus} holds a corpus made with another config (hash 0123456789abcdef" in err, err
    assert err.rstrip().endswith("; remove it, or choose another name or output_root") and "--overwrite" not in err
    assert _files(out) == before  # not even config.yaml was written


def test_check_output_reuses_refuses_or_replaces(tmp_path):
    cfg = load_config(None)
    corpus = tmp_path / "corpus"
    assert check_output(cfg, corpus)[1] is None  # nothing there: a fresh start
    digest = check_output(cfg, corpus)[0]
    corpus.mkdir()
    (corpus / "manifest.json").write_text(json.dumps({"config_hash": digest, "levels": {}}))
    assert check_output(cfg, corpus) == (digest, {"config_hash": digest, "levels": {}})  # same config: resume
    other = load_config(None, overrides=["model.dtype=float32"])
    with pytest.raises(ValueError, match=r"another config .*; use --overwrite or another --out$"):
        check_output(other, corpus)
    assert check_output(other, corpus, overwrite=True)[1] is None and not corpus.exists()


@pytest.mark.model
def test_generate_refuses_a_foreign_output_dir(capsys, tmp_path):
    foreign = tmp_path / "corpus"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, err = _tgsft(capsys, "generate", "--out", str(foreign))
    assert code == 1 and f"{foreign} is not empty and holds no tgsft manifest; use --overwrite" in err
    assert _files(foreign) == ["notes.txt"]


# ----------------------------------------------------------------------------- domain data (exit 1, file/row/field)

BAD_ROW = {
    "invalid JSON": ('{"messages": [}', "line 2: invalid JSON"),
    "missing field": ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
                      "line 2: messages[0].content: missing field"),
    "unknown role": ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
                     "line 2: messages[1].role: unknown role 'bot' (allowed: system, user, assistant)"),
    "empty content": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
                      "line 2: messages[1].content: empty content"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "a"}]},
                          "line 2: messages: no assistant turn (nothing to train on)"),
    "row in another format than the first": ({"instruction": "a", "output": "b"}, "line 2: messages: missing field"),
    "row that is not an object": ("[1, 2]", "line 2: a row must be a JSON object, got list"),
}


@pytest.mark.parametrize("row,needle", BAD_ROW.values(), ids=BAD_ROW.keys())
def test_bad_domain_row(capsys, out, tmp_path, row, needle):
    path = _jsonl(tmp_path / "train.jsonl", [GOOD, row])
    code, err = _run(capsys, out, f"data.train=[{path}]")
    assert code == 1 and f"tgsft: error: {path}: {needle}" in err, err
    assert not out.exists()


def test_bad_domain_files(capsys, out, tmp_path):
    cases = []
    non_utf8 = tmp_path / "latin1.jsonl"
    non_utf8.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    cases.append((non_utf8, f"{non_utf8}: line 2: not valid UTF-8 (byte 0xe9"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases.append((empty, f"{empty}: empty file"))
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    cases.append((csv, f"{csv}: unsupported file type '.csv'; expected .jsonl, .json, .parquet"))
    disguised = tmp_path / "d.jsonl"
    pq.write_table(pa.Table.from_pylist([GOOD]), disguised)
    cases.append((disguised, f"{disguised}: this is a Parquet file but is named .jsonl"))
    cases.append((tmp_path / "missing.jsonl", f"{tmp_path / 'missing.jsonl'}: domain data file not found"))
    for path, needle in cases:
        code, err = _run(capsys, out, f"data.train=[{path}]")
        assert code == 1 and needle in err, (path, err)
    assert not out.exists()


def test_bad_domain_eval_file(capsys, out, tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [GOOD])
    blank = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
    held = _jsonl(tmp_path / "eval.jsonl", [GOOD, GOOD, blank])
    code, err = _run(capsys, out, f"data.train=[{train}]", f"data.eval=[{held}]")
    assert code == 1 and f"{held}: line 3: messages[1].content: empty content" in err, err
    assert not out.exists()


@pytest.mark.model
def test_row_longer_than_max_seq_len(capsys, tmp_path, model_path):
    """Needs the tokenizer: a row whose reply starts beyond train.max_seq_len cannot train and is named."""
    long_row = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    path = _jsonl(tmp_path / "train.jsonl", [GOOD, long_row])
    train_dir = tmp_path / "train"
    code, err = _tgsft(capsys, "train", "-o", f"model.source={model_path}", "-o", f"data.train=[{path}]",
                       "-o", "train.max_seq_len=64", "-o", "mix.tg_ratio=0", "--out", str(train_dir))
    assert code == 1 and f"{path}: line 2: messages: " in err, err
    assert "none of the assistant's within train.max_seq_len=64" in err
    assert not train_dir.exists()


# ----------------------------------------------------------------------------- eval (exit 1)


@pytest.fixture
def fake_model(tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def _eval(capsys, tmp_path, fake_model, url: str, *extra: str) -> tuple[int, str]:
    return _tgsft(capsys, "eval", "--base-url", url, "--model", f"base={fake_model}",
                  "--out", str(tmp_path / "eval"), "-o", f"output_root={tmp_path / 'runs'}", *extra)


def test_eval_missing_data_dir_and_mirror_file(capsys, tmp_path, fake_model):
    code, err = _eval(capsys, tmp_path, fake_model, "http://127.0.0.1:9", "--data-dir", str(tmp_path / "nope"),
                      "-o", "eval.tasks=[tgsft_arc_easy]")
    assert code == 1 and f"eval.data_dir: {tmp_path / 'nope'} is not a directory" in err, err
    (tmp_path / "data").mkdir()
    code, err = _eval(capsys, tmp_path, fake_model, "http://127.0.0.1:9", "--data-dir", str(tmp_path / "data"),
                      "-o", "eval.tasks=[tgsft_arc_easy]")
    assert code == 1 and f"tgsft_arc_easy: no data file; expected {tmp_path / 'data' / 'arc' / 'ARC-Easy-Dev.jsonl'}" \
        in err, err
    assert not (tmp_path / "eval").exists() and not (tmp_path / "runs").exists()


@pytest.mark.model
def test_eval_unknown_task(capsys, tmp_path, fake_model):
    code, err = _eval(capsys, tmp_path, fake_model, "http://127.0.0.1:9", "-o", "eval.tasks=[tgsft_general,arc_eazy]")
    assert code == 1 and "eval.tasks: unknown task 'arc_eazy'; did you mean arc_easy" in err, err
    assert not (tmp_path / "eval").exists()


def test_eval_unreachable_endpoint(capsys, tmp_path, fake_model):
    url = f"http://127.0.0.1:{free_port()}"
    code, err = _eval(capsys, tmp_path, fake_model, url, "-o", "serve.ready_timeout_s=2")
    assert code == 1 and f"{url}: models ['base'] not ready after 2 s" in err and "refused" in err, err
    assert not (tmp_path / "eval").exists()


@pytest.mark.model
def test_eval_endpoint_without_prompt_logprobs(capsys, tmp_path, fake_model, no_logprobs_endpoint):
    code, err = _eval(capsys, tmp_path, fake_model, no_logprobs_endpoint)
    assert code == 1 and "(model 'base') must return prompt-token logprobs with echo=true" in err, err
    assert "token_logprobs=[]" in err
    assert not (tmp_path / "eval").exists()


# ----------------------------------------------------------------------------- serve, report, disk


def test_serve_bad_model_arguments(capsys, tmp_path):
    code, err = _tgsft(capsys, "serve", "--model", f"base={tmp_path / 'nope'}")
    assert code == 1 and f"serve: model 'base': {tmp_path / 'nope'} is not a Hugging Face model folder" in err, err
    code, err = _tgsft(capsys, "serve", "--model", "base")
    assert code == 1 and "--model 'base': expected ID=PATH" in err, err


def test_report_without_eval_results(capsys, tmp_path):
    code, err = _tgsft(capsys, "report", str(tmp_path))
    assert code == 1 and str(tmp_path / "eval") in err, err
    assert _files(tmp_path) == []


def _eval_results(eval_dir: Path) -> None:
    eval_dir.mkdir(parents=True)
    metric = {"value": 0.5, "stderr": 0.1, "higher_is_better": True}
    for model_id in ("base", "tuned"):
        result = {"model_id": model_id, "tasks": {"tgsft_general": {"n": 32, "metrics": {"acc": metric}}}}
        (eval_dir / f"{model_id}.json").write_text(json.dumps(result))


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) for a private tmpfs")
def test_disk_full_is_reported_and_leaves_no_partial_report(tmp_path):
    """A real full disk: the report goes to a 12 KiB tmpfs (private mount namespace) that holds the eval results."""
    src = tmp_path / "src"
    _eval_results(src / "eval")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=12k tmpfs {mnt} && cp -r {src}/eval {mnt}/ && "
              f"{sys.executable} -m pipeline.cli report {mnt}; echo rc=$?; ls -a {mnt}/report 2>&1")
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):  # as root, or in a user namespace
        proc = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "MPLBACKEND": "Agg"}, timeout=300)
        if "rc=" in proc.stdout:
            break
    else:
        pytest.skip(f"cannot mount a private tmpfs here: {proc.stderr.strip()[:200]}")
    assert "rc=1" in proc.stdout, proc.stdout + proc.stderr
    assert f"tgsft: error: {mnt}/report/report.png: No space left on device (the disk is full)" in proc.stderr
    listing = proc.stdout.split("rc=1", 1)[1].split()
    assert sorted(listing) == [".", ".."], listing  # no report files, no temporary files
