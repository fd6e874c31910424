"""actors.ds_ops.load_guarded: a torch build lock left by a killed loader does not hang the next load; a live loader
is still waited for."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from actors.ds_ops import load_guarded

REPO = Path(__file__).resolve().parents[2]

# A loader killed half-way: it takes the guard, creates torch's lock file as torch does, then hangs until killed.
_KILLED_LOADER = """
import os, sys, time
from actors.ds_ops import load_guarded
def load():
    os.close(os.open(os.path.join(sys.argv[1], "lock"), os.O_CREAT | os.O_EXCL))
    print("building", flush=True)
    time.sleep(600)
load_guarded(sys.argv[1], load)
"""


def test_lock_left_by_a_killed_loader_is_removed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_LOADER, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "building"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (tmp_path / "lock").exists()  # what torch's own loader would now wait on forever

    seen = []
    result, removed = load_guarded(str(tmp_path), lambda: seen.append((tmp_path / "lock").exists()) or "op")
    assert (result, removed, seen) == ("op", True, [False])


def test_no_lock_nothing_removed(tmp_path):
    build_dir = tmp_path / "new" / "op"
    assert load_guarded(str(build_dir), lambda: 7) == (7, False)
    assert build_dir.is_dir() and not (build_dir / "lock").exists()


def test_a_live_loader_is_waited_for(tmp_path):
    holder = open(tmp_path / "tgsft.flock", "a")  # another loader, alive, mid-build
    fcntl.flock(holder, fcntl.LOCK_EX)
    (tmp_path / "lock").touch()
    called = threading.Event()
    waiter = threading.Thread(target=load_guarded, args=(str(tmp_path), called.set))
    waiter.start()
    time.sleep(0.5)
    assert not called.is_set()  # its lock is not touched while it holds the guard
    assert (tmp_path / "lock").exists()
    (tmp_path / "lock").unlink()  # torch's release, then the guard's
    holder.close()
    waiter.join(timeout=30)
    assert called.is_set()
