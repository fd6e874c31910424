"""The terminal of ``tgsft run``: the pipeline's own lines and a training progress bar; everything else to a file.

Quiet (the default): file descriptors 1 and 2 of the driver point at ``<run_dir>/logs/tgsft.log`` for the length of
the run, so what Ray, Ray Data, Ray Train, Serve, vLLM, DeepSpeed and lm-eval print, in the driver and (through
Ray's log forwarding) in every actor and worker, lands there, while :meth:`Console.log` writes to the terminal (and
the file). Training progress reaches the driver through a JSON-lines file rank 0 appends to
(:func:`append_progress`, :func:`follow_progress`). Verbose (``tgsft run --verbose``): nothing is redirected and the
workers' own step lines show.

An error leaves the redirect first, so it prints in full, and carries a note naming the log file.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

__all__ = ["Console", "append_progress", "follow_progress"]


def append_progress(path: str | Path, record: dict[str, Any]) -> None:
    """Append one progress record (a JSON line) to ``path``."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


@contextmanager
def follow_progress(path: Path, on_record: Callable[[dict[str, Any]], None], *, interval_s: float = 0.5
                    ) -> Iterator[None]:
    """Call ``on_record`` for every record appended to ``path`` while the block runs (the file starts empty).

    A background thread polls the file every ``interval_s``; the records left when the block ends are delivered
    before it returns. A record that fails to parse (a line still being written) waits for the next poll.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("", encoding="utf-8")
    offset = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal offset
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        done = chunk.rfind(b"\n") + 1
        for line in chunk[:done].splitlines():
            if line.strip():
                on_record(json.loads(line))
        offset += done

    def loop() -> None:
        while not stop.wait(interval_s):
            poll()

    thread = threading.Thread(target=loop, name="tgsft-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll()


class Console:
    """What ``tgsft run`` shows. Use as a context manager around the run.

    Args:
        log_file: where everything else goes in quiet mode (created with its folder).
        verbose: redirect nothing and show every library's output.
    """

    def __init__(self, log_file: Path, *, verbose: bool = False) -> None:
        self.log_file = Path(log_file)
        self.verbose = verbose
        self._out: TextIO = sys.stdout
        self._saved: tuple[int, int] | None = None
        self._streams: tuple[TextIO, TextIO] = (sys.stdout, sys.stderr)
        self._bar: Any = None
        self._lock = threading.Lock()
        self._shown: set[str] = set()

    def __enter__(self) -> Console:
        if self.verbose:
            return self
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self._out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        # Python-level writers too, whatever sys.stdout was (an embedding program may have replaced it).
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close_bar()
        if self._saved is None:
            return
        if exc is not None:
            traceback.print_exception(exc_type, exc, tb, file=sys.stderr)  # the full story stays in the file too
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = self._streams
        for fd, saved in zip((1, 2), self._saved):
            os.dup2(saved, fd)
            os.close(saved)
        self._saved = None
        self._out.close()
        self._out = sys.stdout
        if isinstance(exc, Exception):
            exc.add_note(f"full logs: {self.log_file}")
        elif exc is not None:  # SystemExit (Ray raises it when the driver is interrupted), KeyboardInterrupt
            detail = f": {exc}" if str(exc) else ""
            print(f"tgsft: stopped ({type(exc).__name__}{detail}); full logs: {self.log_file}", file=sys.stderr)

    def log(self, line: str) -> None:
        """Show a line (and keep it in the log file). Quiet: a line shown before (the same model check at every
        stage, say) goes to the log file only."""
        with self._lock:
            if self._saved is None or line not in self._shown:
                self._shown.add(line)
                if self._bar is not None:
                    self._bar.clear()
                print(line, file=self._out, flush=True)
                if self._bar is not None:
                    self._bar.refresh()
        if self._saved is not None:
            print(line, flush=True)  # fd 1 is the log file

    def training(self, label: str) -> Callable[[dict[str, Any]], None] | None:
        """A consumer of training progress records (:func:`follow_progress`) that draws a progress bar with loss
        and tokens/s on a terminal, or logs a line at every quarter of the steps otherwise; None when verbose
        (the workers' own step lines show)."""
        if self.verbose:
            return None
        self._close_bar()
        tty = self._out.isatty()
        shown: set[int] = set()

        def on_record(r: dict[str, Any]) -> None:
            step, total = int(r["step"]), int(r["total_steps"])
            text = f"loss {r['loss']:.4f}, {r['tokens_per_s']:.0f} tokens/s"
            if not tty:
                quarter = 4 * step // total
                if quarter not in shown and (quarter > 0 or step == 1):
                    shown.add(quarter)
                    self.log(f"{label}: step {step}/{total}, {text}")
                return
            with self._lock:
                if self._bar is None:
                    from tqdm import tqdm

                    self._bar = tqdm(total=total, desc=label, unit="step", file=self._out, dynamic_ncols=True,
                                     bar_format="{desc}: {n}/{total} steps |{bar}| {elapsed}<{remaining}{postfix}")
                self._bar.set_postfix_str(text, refresh=False)
                self._bar.update(step - self._bar.n)
                if step >= total:
                    self._bar.close()
                    self._bar = None

        return on_record

    def _close_bar(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
