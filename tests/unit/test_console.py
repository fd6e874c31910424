"""The quiet console of `tgsft run`: library output (this process and its children) goes to the log file, the
pipeline's own lines to the terminal (once) and the file; errors leave with a note naming the file; training progress
records written by a worker reach the driver in order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from pipeline.console import Console, append_progress, follow_progress


def test_quiet_console_sends_library_output_to_the_log_file(tmp_path, capfd):
    log_file = tmp_path / "logs" / "tgsft.log"
    with Console(log_file) as console:
        console.log("== generate")
        print("a library's print")
        print("a library's warning", file=sys.stderr)
        os.write(1, b"raw fd output\n")
        subprocess.run([sys.executable, "-c", "print('child process output')"], check=True)
        console.log("model ready")
        console.log("== train")
        console.log("model ready")  # a repeat is kept in the file only
    out, err = capfd.readouterr()
    assert out.splitlines() == ["== generate", "model ready", "== train"] and err == ""
    text = log_file.read_text()
    assert text.count("model ready") == 2
    for line in ("== generate", "a library's print", "a library's warning", "raw fd output", "child process output",
                 "== train"):
        assert line in text
    print("after")  # the descriptors are back
    assert capfd.readouterr().out == "after\n"


def test_an_error_names_the_log_file_and_its_traceback_is_kept(tmp_path, capfd):
    log_file = tmp_path / "tgsft.log"
    with pytest.raises(RuntimeError) as info, Console(log_file):
        raise RuntimeError("engine died")
    assert info.value.__notes__ == [f"full logs: {log_file}"]
    assert "RuntimeError: engine died" in log_file.read_text()
    capfd.readouterr()


def test_a_stop_without_a_traceback_still_names_the_log_file(tmp_path, capfd):
    log_file = tmp_path / "tgsft.log"
    with pytest.raises(SystemExit), Console(log_file):
        raise SystemExit(1)
    assert capfd.readouterr().err == f"tgsft: stopped (SystemExit: 1); full logs: {log_file}\n"


def test_verbose_console_redirects_nothing(tmp_path, capfd):
    with Console(tmp_path / "tgsft.log", verbose=True) as console:
        console.log("mine")
        print("theirs")
        assert console.training("train") is None
    assert capfd.readouterr().out == "mine\ntheirs\n"
    assert not (tmp_path / "tgsft.log").exists()


def test_training_progress_off_a_terminal_logs_each_quarter(tmp_path, capfd):
    with Console(tmp_path / "tgsft.log") as console:
        on_record = console.training("train")
        for step in range(1, 15):
            on_record({"step": step, "total_steps": 14, "loss": 2.0 / step, "lr": 1e-4, "tokens_per_s": 80.0})
    lines = capfd.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "train: step 1/14", "train: step 4/14", "train: step 7/14", "train: step 11/14", "train: step 14/14"]
    assert lines[-1] == "train: step 14/14, loss 0.1429, 80 tokens/s"


def test_follow_progress_delivers_every_record_in_order(tmp_path):
    path = tmp_path / "progress.jsonl"
    seen: list[int] = []

    def worker() -> None:
        for step in range(1, 41):
            append_progress(path, {"step": step})
            time.sleep(0.002)

    with follow_progress(path, lambda r: seen.append(r["step"]), interval_s=0.01):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert seen == list(range(1, 41))
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == seen


def test_the_console_shows_the_reports_headline_section():
    from pipeline.run import _headline

    md = "# Forgetting report\n\n## Headline: what did TG save?\n\n| a |\n|---|\n\n## Paired comparisons\n\n| b |\n"
    assert _headline(md) == "# Forgetting report\n\n## Headline: what did TG save?\n\n| a |\n|---|"
    assert _headline("# Forgetting report\n\n## General benchmarks\n\n| c |\n") == (
        "# Forgetting report\n\n## General benchmarks\n\n| c |")
