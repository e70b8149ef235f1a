"""Finding and stopping every process a run started, including detached descendants.

Flower's SuperLink/SuperNode start SuperExec in a new session, and Ray starts its
daemons under the driver; a process whose parent died is re-parented to init. So
besides walking the tree, each started process gets a unique marker in its
environment (inherited by every descendant) that a sweep of /proc can find.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

MARKER_ENV = "COGOV_FL_RUN_MARKER"


def new_marker() -> str:
    return uuid.uuid4().hex


def marked_pids(marker: str) -> set[int]:
    """Live processes (of this user) whose environment carries `marker`."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone, or not ours
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.add(int(entry.name))
    return found


def terminate_marked(marker: str, grace: float = 5.0) -> set[int]:
    """SIGTERM every marked process, SIGKILL the ones still alive after `grace`."""
    pids = marked_pids(marker)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and marked_pids(marker):
        time.sleep(0.1)
    leftover = marked_pids(marker)
    _signal_all(leftover, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and marked_pids(marker):
        time.sleep(0.1)
    return pids


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Terminate a child started with `start_new_session=True` and its whole group."""
    if proc.poll() is None:
        _kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)
    # The leader may be gone while members of its group live on.
    _kill_group(proc.pid, signal.SIGKILL)


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
