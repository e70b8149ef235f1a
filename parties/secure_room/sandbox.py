"""The OS sandbox: bubblewrap as an unprivileged host user, seccomp from the start, rlimits.

Inside: new user, pid, net (empty), ipc, uts, cgroup and mount namespaces; uid/gid
65534 with no capabilities; a root made of read-only binds of /usr, the Python
installation and the venv, the staged package (/pkg), the projected inputs (/data) and
the job (/job); a size-capped tmpfs /tmp; one writable, size-capped /out. No /etc, no
/home; a fresh /proc, remounted read-only.

Outside: when the node is root, bwrap runs as the dedicated host uid 65530 (setpriv), so
the sandbox's uid maps to an unprivileged host user and nothing in it can write a host
kernel setting. The run's directories live on a tmpfs the node mounts for the run (its
host path does not show in the sandbox's mountinfo), and /out is a tmpfs of its own,
capped at `output_bytes`. bwrap installs the seccomp filter (`--seccomp`) just before it
executes the harness as pid 1 (`--as-pid-1`): no process in the sandbox is unfiltered.
Each run gets a cgroup of its own (`cgroup.py`) where the node can make one: memory,
the sandbox's tmpfs pages included, and tasks are capped there, and CPU time and peak
memory are the kernel's account of it. The command runs under a small spawner process
(`_SPAWNER`), which puts its forked child into that cgroup before executing the
sandbox. Without a cgroup the run says so (`isolation = "rlimits_only"`): memory is
capped as address space only, tasks per host uid, and CPU time and peak memory come
from wait4 and the spawner (which forks the sandbox from its own few megabytes, so the
node's resident set is not inherited) over a pipe the sandbox cannot reach. Nothing is
ever read from the sandbox for metering.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from parties.secure_room._harness import seccomp_program
from parties.secure_room.api import SandboxUnavailable
from parties.secure_room.cgroup import Isolation, run_cgroup

HARNESS_FILE = Path(__file__).with_name("_harness.py")
SANDBOX_UID = 65534  # the uid inside the sandbox
HOST_UID = 65530  # the unprivileged host uid bwrap runs as when the node is root
_POLL_SECONDS = 0.01
# argv: report fd, the number of cgroup.procs files, those files, then the command.
# Forks; the child joins the run's cgroup before it executes the command (or exits 70
# without running it); the spawner waits, writes the child's peak RSS (KiB) to the
# report fd (close-on-exec, so the sandbox never holds it) and exits with its status.
_SPAWNER = (
    "import os, sys\n"
    "report, count = int(sys.argv[1]), int(sys.argv[2])\n"
    "procs, command = sys.argv[3:3 + count], sys.argv[3 + count:]\n"
    "os.set_inheritable(report, False)\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    try:\n"
    "        for path in procs:\n"
    "            fd = os.open(path, os.O_WRONLY)\n"
    "            os.write(fd, str(os.getpid()).encode())\n"
    "            os.close(fd)\n"
    "        os.execvp(command[0], command)\n"
    "    finally:\n"
    "        os._exit(70)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "os.write(report, str(usage.ru_maxrss).encode())\n"
    "os._exit(os.waitstatus_to_exitcode(status) & 0xFF)\n"
)
_TAIL_BYTES = 4000


@dataclass(frozen=True)
class SandboxLimits:
    """Resource ceilings of one sandboxed run."""

    cpu_seconds: int = 30
    memory_bytes: int = 2 * 1024**3  # the run's cgroup (tmpfs pages included), and RLIMIT_AS
    wall_seconds: float = 60.0
    output_bytes: int = 64 * 1024**2  # all of /out together
    tmp_bytes: int = 64 * 1024**2  # the sandbox's /tmp
    tasks: int = 64  # processes and threads: the cgroup's pids.max, else RLIMIT_NPROC
    open_files: int = 256
    output_rows: int = 100_000

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class SandboxRun:
    """What the node measured of one run from outside the sandbox."""

    command: list[str]
    exit_code: int
    signal: int | None
    timed_out: bool
    wall_seconds: float
    cpu_seconds: float
    peak_memory_bytes: int | None  # None: killed at the wall limit before it was measured
    stderr_tail: str
    isolation: Isolation
    oom_kills: int = 0  # processes the cgroup's memory limit killed
    tasks_refused: int = 0  # forks and threads the cgroup's task limit refused


@dataclass(frozen=True)
class RunArea:
    """One run's directories: pkg, data, job (read-only inside) and out (writable)."""

    root: Path
    harness: Path
    pkg: Path
    data: Path
    job: Path
    out: Path
    logs: Path
    parse_in: Path
    parsed: Path
    python: dict[str, Path]  # path inside the sandbox -> a directory the sandbox user can read


def _privileged() -> bool:
    return os.geteuid() == 0


def _mount_tmpfs(target: Path, options: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "cogov-room", str(target)],
                   check=True, capture_output=True)


def _unmount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


@contextlib.contextmanager
def run_area(limits: SandboxLimits) -> Iterator[RunArea]:
    """A fresh area for one run; as root, on tmpfs mounts removed when the run ends.

    The area's root is a tmpfs readable by the sandbox user and writable by the node
    only; its `out` is a second tmpfs owned by the sandbox user, capped at
    `limits.output_bytes`; so is `parsed`, where the output parser writes. Without
    root, plain directories (and no total cap on /out).
    """
    with tempfile.TemporaryDirectory(prefix="cogov-secure-room-") as work:
        root = Path(work)
        mounted: list[Path] = []
        try:
            if _privileged():
                _mount_tmpfs(root, "mode=0755,nosuid,nodev")
                mounted.append(root)
            area = RunArea(root=root, harness=root / "harness", pkg=root / "pkg",
                           data=root / "data", job=root / "job", out=root / "out",
                           logs=root / "logs", parse_in=root / "parse-in",
                           parsed=root / "parsed", python={})
            for path in (area.harness, area.pkg, area.data, area.job, area.out, area.logs,
                         area.parse_in, area.parsed):
                path.mkdir()
            area.logs.chmod(0o700)
            for writable in (area.out, area.parsed):
                if _privileged():
                    _mount_tmpfs(writable, f"size={limits.output_bytes},mode=0700,"
                                           f"uid={HOST_UID},gid={HOST_UID},nosuid,nodev,noexec")
                    mounted.append(writable)
                else:
                    writable.chmod(0o777)
            shutil.copyfile(HARNESS_FILE, area.harness / "harness.py")
            for index, python_root in enumerate(_python_roots()):
                if _privileged():
                    # The interpreter may live under a directory only root can enter
                    # (/root/.pyenv): a read-only bind here makes it reachable.
                    target = root / f"python-{index}"
                    target.mkdir()
                    subprocess.run(["mount", "--bind", "-o", "ro", str(python_root),
                                    str(target)], check=True, capture_output=True)
                    mounted.append(target)
                    area.python[str(python_root)] = target
                else:
                    area.python[str(python_root)] = python_root
            yield area
        finally:
            for path in reversed(mounted):
                _unmount(path)


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


def _unprivileged_prefix() -> list[str]:
    if not _privileged():
        return []
    return [shutil.which("setpriv") or "setpriv", f"--reuid={HOST_UID}", f"--regid={HOST_UID}",
            "--clear-groups", "--no-new-privs", "--inh-caps=-all", "--"]


def sandbox_command(
    *, read_only: dict[str, Path], out_dir: Path, limits: SandboxLimits, harness_args: list[str],
    seccomp_fd: int, isolation: Isolation,
) -> list[str]:
    """The exact command line: prlimit, setpriv (as root), bwrap, then the harness.

    `read_only` maps a path inside the sandbox to the host directory bound there, the
    Python installation (`RunArea.python`) included. In a cgroup the task cap is the
    cgroup's own; RLIMIT_NPROC, counted per host uid and so shared by concurrent runs,
    is only the fallback.
    """
    cpu_hard = limits.cpu_seconds + 1  # SIGXCPU at the soft limit, SIGKILL one second later
    command = [
        shutil.which("prlimit") or "prlimit",
        f"--cpu={limits.cpu_seconds}:{cpu_hard}",
        f"--as={limits.memory_bytes}",
        f"--fsize={limits.output_bytes}",
        f"--nofile={limits.open_files}",
        *([] if isolation != "rlimits_only" else [f"--nproc={limits.tasks}"]),
        "--core=0",
        "--",
        *_unprivileged_prefix(),
        shutil.which("bwrap") or "bwrap",
        "--unshare-all", "--unshare-user", "--disable-userns",
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
        "--cap-drop", "ALL",
        "--die-with-parent", "--new-session", "--as-pid-1",
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
        "--size", str(limits.tmp_bytes), "--tmpfs", "/tmp",
    ]
    for inside, host in read_only.items():
        command += ["--ro-bind", str(host), inside]
    command += [
        "--bind", str(out_dir), "/out",
        "--proc", "/proc", "--remount-ro", "/proc",
        "--dev", "/dev",
        "--chdir", "/tmp",
        "--seccomp", str(seccomp_fd),
        sys.executable, "-I", "-B", "/harness/harness.py", *harness_args,
    ]
    return command


@functools.cache
def sandbox_available() -> str:
    """Probe once that bwrap can build the namespaces here; return its version line."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(
            "bubblewrap is not installed (apt-get install -y bubblewrap)")
    for tool in ("prlimit", *(("setpriv", "mount") if _privileged() else ())):
        if shutil.which(tool) is None:
            raise SandboxUnavailable(f"{tool} (util-linux) is not installed")
    if platform.machine() not in ("x86_64", "aarch64"):
        raise SandboxUnavailable(f"no seccomp filter for machine {platform.machine()!r}")
    probe = [*_unprivileged_prefix(), bwrap, "--unshare-all", "--unshare-user",
             "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--cap-drop", "ALL",
             "--die-with-parent", "--as-pid-1", *_system_binds(), "--proc", "/proc",
             "--remount-ro", "/proc", "--dev", "/dev", "/usr/bin/true"]
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


def _tail(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(max(0, os.fstat(handle.fileno()).st_size - _TAIL_BYTES))
        return handle.read(_TAIL_BYTES).decode("utf-8", errors="replace")


def _seccomp_pipe() -> int:
    """A pipe's read end holding the BPF program for bwrap's `--seccomp`."""
    program = seccomp_program(platform.machine(), exec_allowed=True)
    read_end, write_end = os.pipe()
    os.write(write_end, program)  # a few hundred bytes: far below the pipe's buffer
    os.close(write_end)
    return read_end


def run_sandboxed(
    *, read_only: dict[str, Path], out_dir: Path, logs: Path, limits: SandboxLimits,
    harness_args: list[str],
) -> SandboxRun:
    """Run the harness in the sandbox, in a cgroup of its own where the node can make one;
    kill the whole sandbox at the wall limit.

    stdout and stderr go to files under `logs` (the node's, never the sandbox's).
    """
    sandbox_available()
    with run_cgroup(memory_bytes=limits.memory_bytes, tasks=limits.tasks) as cgroup:
        isolation = cgroup.version if cgroup is not None else "rlimits_only"
        procs = [str(p) for p in cgroup.procs_files] if cgroup is not None else []
        seccomp_fd = _seccomp_pipe()
        report_read, report_write = os.pipe()
        try:
            command = sandbox_command(read_only=read_only, out_dir=out_dir, limits=limits,
                                      harness_args=harness_args, seccomp_fd=seccomp_fd,
                                      isolation=isolation)
            started = time.monotonic()
            with open(logs / "stdout", "wb") as stdout, open(logs / "stderr", "wb") as stderr:
                process = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _SPAWNER, str(report_write),
                     str(len(procs)), *procs, *command],
                    stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                    start_new_session=True, pass_fds=(seccomp_fd, report_write),
                    env={"PATH": "/usr/bin:/bin"})
        finally:
            os.close(seccomp_fd)
            os.close(report_write)
        timed_out = False
        while True:
            pid, wait_status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > limits.wall_seconds:
                timed_out = True
                inside = _descendants(process.pid)
                os.killpg(process.pid, signal.SIGKILL)
                _, wait_status, usage = os.wait4(process.pid, 0)
                # The sandboxed processes run in their own session (bwrap --new-session)
                # and die by PR_SET_PDEATHSIG, asynchronously: wait until they are gone.
                _kill_and_wait(inside)
                break
            time.sleep(_POLL_SECONDS)
        wall = time.monotonic() - started
        if cgroup is not None:
            cgroup.kill()  # nothing of the run outlives it, whatever it escaped from
            measured = cgroup.usage()
    process.returncode = exit_code = os.waitstatus_to_exitcode(wait_status)
    # bwrap reports a child killed by signal N as exit status 128 + N.
    if exit_code < 0:
        sig: int | None = -exit_code
    elif exit_code > 128:
        sig = exit_code - 128
    else:
        sig = None
    with os.fdopen(report_read, "rb") as report:
        peak_kib = report.read(32)
    if cgroup is not None:
        # The kernel's account of the cgroup: every process of the run, tmpfs pages too.
        return SandboxRun(command=command, exit_code=exit_code, signal=sig,
                          timed_out=timed_out, wall_seconds=wall,
                          cpu_seconds=measured.cpu_seconds,
                          peak_memory_bytes=measured.peak_memory_bytes,
                          stderr_tail=_tail(logs / "stderr"), isolation=isolation,
                          oom_kills=measured.oom_kills, tasks_refused=measured.tasks_refused)
    # Without a cgroup: wait4's usage covers the waited process and every descendant it
    # reaped (bwrap reaps the harness); the largest resident set is the spawner's report
    # (none if the spawner was killed at the wall limit).
    return SandboxRun(command=command, exit_code=exit_code, signal=sig, timed_out=timed_out,
                      wall_seconds=wall, cpu_seconds=usage.ru_utime + usage.ru_stime,
                      peak_memory_bytes=int(peak_kib) * 1024 if peak_kib.isdigit() else None,
                      stderr_tail=_tail(logs / "stderr"), isolation=isolation)
