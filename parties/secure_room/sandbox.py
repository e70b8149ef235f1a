"""The OS sandbox: bubblewrap namespaces, rlimits via prlimit, a wall clock, /proc metering.

Inside: new user, pid, net (empty), ipc, uts, cgroup and mount namespaces; uid/gid
65534 with no capabilities; a root made of read-only binds of /usr, the Python
installation and the venv, the staged package (/pkg), the projected inputs (/data) and
the job (/job); a tmpfs /tmp; one writable bind (/out). No /etc, no /home, no host
/proc. The harness adds a seccomp filter before the package's code runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from parties.secure_room.api import SandboxUnavailable

HARNESS_FILE = Path(__file__).with_name("_harness.py")
SANDBOX_UID = 65534
_POLL_SECONDS = 0.01
_TAIL_CHARS = 4000


@dataclass(frozen=True)
class SandboxLimits:
    """Resource ceilings of one sandboxed run."""

    cpu_seconds: int = 30
    memory_bytes: int = 2 * 1024**3
    wall_seconds: float = 60.0
    output_bytes: int = 256 * 1024**2
    open_files: int = 256

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class SandboxRun:
    """What the OS saw of one run (the harness's own account is in `status`)."""

    command: list[str]
    exit_code: int
    signal: int | None
    timed_out: bool
    wall_seconds: float
    peak_memory_bytes: int
    stdout_tail: str
    stderr_tail: str
    status: dict | None


def _python_roots() -> list[Path]:
    """Directories this interpreter needs: the venv (if any) and the base installation."""
    roots = {Path(sys.prefix), Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    ordered: list[Path] = []
    for root in sorted(roots, key=lambda p: len(p.parts)):
        if not any(root.is_relative_to(kept) for kept in ordered):
            ordered.append(root)
    return ordered


def _system_binds() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    return args


def sandbox_command(
    *, package_dir: Path, data_dir: Path, job_dir: Path, out_dir: Path, limits: SandboxLimits,
) -> list[str]:
    """The exact command line: prlimit (rlimits) then bwrap (namespaces, mounts) then Python."""
    cpu_hard = limits.cpu_seconds + 1  # SIGXCPU at the soft limit, SIGKILL one second later
    command = [
        shutil.which("prlimit") or "prlimit",
        f"--cpu={limits.cpu_seconds}:{cpu_hard}",
        f"--as={limits.memory_bytes}",
        f"--fsize={limits.output_bytes}",
        f"--nofile={limits.open_files}",
        "--core=0",
        "--",
        shutil.which("bwrap") or "bwrap",
        "--unshare-all", "--unshare-user",
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
        "--cap-drop", "ALL",
        "--die-with-parent", "--new-session",
        "--hostname", "secure-room",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin",
        "--setenv", "HOME", "/tmp",
        "--setenv", "LANG", "C.UTF-8",
        "--setenv", "OMP_NUM_THREADS", "1",
        "--setenv", "OPENBLAS_NUM_THREADS", "1",
        "--setenv", "MKL_NUM_THREADS", "1",
        *_system_binds(),
        # Mounted before the Python roots: bwrap applies mounts in order, and a venv
        # that lives under /tmp (a clone in /tmp) must stay visible above this tmpfs.
        "--tmpfs", "/tmp",
    ]
    for root in _python_roots():
        command += ["--ro-bind", str(root), str(root)]
    command += [
        "--ro-bind", str(HARNESS_FILE), "/harness/harness.py",
        "--ro-bind", str(package_dir), "/pkg",
        "--ro-bind", str(data_dir), "/data",
        "--ro-bind", str(job_dir), "/job",
        "--bind", str(out_dir), "/out",
        "--proc", "/proc",
        "--dev", "/dev",
        "--chdir", "/tmp",
        sys.executable, "-I", "-B", "/harness/harness.py",
    ]
    return command


@functools.cache
def sandbox_available() -> str:
    """Probe once that bwrap can build the namespaces here; return its version line."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(
            "bubblewrap is not installed (apt-get install -y bubblewrap)")
    if shutil.which("prlimit") is None:
        raise SandboxUnavailable("prlimit (util-linux) is not installed")
    probe = [bwrap, "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID),
             "--gid", str(SANDBOX_UID), "--cap-drop", "ALL", "--die-with-parent",
             *_system_binds(), "--proc", "/proc", "--dev", "/dev", "/usr/bin/true"]
    result = subprocess.run(probe, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise SandboxUnavailable(f"bwrap cannot create namespaces here: {result.stderr.strip()}")
    return subprocess.run([bwrap, "--version"], capture_output=True, text=True,
                          check=False).stdout.strip()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as handle:
                found += [int(p) for p in handle.read().split()]
    except OSError:
        pass
    return found


def _descendants(root: int) -> list[int]:
    found, stack = [], _children(root)
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack += _children(pid)
    return found


def _kill_and_wait(pids: list[int], timeout: float = 5.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.02)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _tree_peak_rss(root: int) -> int:
    """Largest VmHWM (peak resident set) among `root` and its descendants, in bytes."""
    peak, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
                        break
        except OSError:
            continue
        stack += _children(pid)
    return peak


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-_TAIL_CHARS:].decode("utf-8", errors="replace")


def run_sandboxed(
    *, package_dir: Path, data_dir: Path, job_dir: Path, out_dir: Path, limits: SandboxLimits,
) -> SandboxRun:
    """Run the harness in the sandbox; kill the whole process group at the wall limit."""
    sandbox_available()
    command = sandbox_command(package_dir=package_dir, data_dir=data_dir, job_dir=job_dir,
                              out_dir=out_dir, limits=limits)
    logs = job_dir.parent / "logs"
    logs.mkdir(exist_ok=True)
    started = time.monotonic()
    with open(logs / "stdout", "wb") as stdout, open(logs / "stderr", "wb") as stderr:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout,
                                   stderr=stderr, start_new_session=True, close_fds=True,
                                   env={"PATH": "/usr/bin:/bin"})
    peak, timed_out = 0, False
    while True:
        pid, wait_status, _ = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, _tree_peak_rss(process.pid))
        if time.monotonic() - started > limits.wall_seconds:
            timed_out = True
            inside = _descendants(process.pid)
            os.killpg(process.pid, signal.SIGKILL)
            _, wait_status, _ = os.wait4(process.pid, 0)
            # The sandboxed processes run in their own session (bwrap --new-session) and
            # die by PR_SET_PDEATHSIG, asynchronously: wait until they are really gone.
            _kill_and_wait(inside)
            break
        time.sleep(_POLL_SECONDS)
    wall = time.monotonic() - started
    exit_code = os.waitstatus_to_exitcode(wait_status)
    process.returncode = exit_code
    # bwrap reports a child killed by signal N as exit status 128 + N.
    if exit_code < 0:
        sig: int | None = -exit_code
    elif exit_code > 128:
        sig = exit_code - 128
    else:
        sig = None
    status = None
    status_file = out_dir / "status.json"
    if status_file.is_file():
        try:
            status = json.loads(status_file.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            status = None
    if status and isinstance(status.get("maxrss_kb"), int):
        peak = max(peak, status["maxrss_kb"] * 1024)
    return SandboxRun(command=command, exit_code=exit_code, signal=sig, timed_out=timed_out,
                      wall_seconds=wall, peak_memory_bytes=peak,
                      stdout_tail=_tail(logs / "stdout"), stderr_tail=_tail(logs / "stderr"),
                      status=status)
