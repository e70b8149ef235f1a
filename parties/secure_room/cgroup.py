"""A cgroup per sandboxed run: memory (tmpfs pages included) and task limits, CPU and peak
memory measured by the kernel, from outside the sandbox.

The node (root) creates a fresh cgroup under its own one for every run, on cgroup v1
(one directory in each of the memory, pids and cpuacct hierarchies) or on cgroup v2 (one
directory in the unified hierarchy, whose parent must delegate memory and pids), sets
the limits, and hands the spawner the `cgroup.procs` files: the spawner writes the
forked child's pid there before it executes the sandbox, so every process of the run is
inside from its first instruction. Pages of the sandbox's tmpfs `/tmp` are charged to
the process that writes them, so a `/tmp` fill counts against the memory limit. When the
run ends the node kills whatever is left in the cgroup, reads the counters and removes it.

Where no cgroup can be made (not root, no memory or pids controller, a v2 parent that
does not delegate them) `run_cgroup` yields None and the room falls back to rlimits.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Isolation = Literal["cgroup_v1", "cgroup_v2", "rlimits_only"]
_V1_CONTROLLERS = ("memory", "pids", "cpuacct")
_REMOVE_SECONDS = 10.0


@dataclass(frozen=True)
class CgroupUsage:
    """What the kernel accounted for one run's cgroup."""

    cpu_seconds: float
    peak_memory_bytes: int
    oom_kills: int  # processes the memory limit killed
    tasks_refused: int  # forks and threads refused at the task limit


def _own_cgroups() -> dict[str, str]:
    """controller name ('' for the unified hierarchy) -> this process's cgroup path."""
    found = {}
    for line in Path("/proc/self/cgroup").read_text(encoding="ascii").splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            found[name] = path
    return found


def _mounts() -> dict[str, tuple[str, Path]]:
    """controller name ('' for cgroup2) -> (mount root, mount point)."""
    found: dict[str, tuple[str, Path]] = {}
    for line in Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines():
        before, after = line.split(" - ", 1)
        fields, (fstype, _, options) = before.split(), after.split(" ", 2)
        root, point = fields[3], Path(fields[4])
        if fstype == "cgroup2":
            found.setdefault("", (root, point))
        elif fstype == "cgroup":
            for option in options.split(","):
                if option in _V1_CONTROLLERS:
                    found.setdefault(option, (root, point))
    return found


def _directory(mounts: dict[str, tuple[str, Path]], own: dict[str, str], name: str) -> Path:
    root, point = mounts[name]
    relative = os.path.relpath(own[name], root) if own[name].startswith(root) else "."
    return (point / relative).resolve()


def _write(path: Path, value: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(value)


def _read_int(path: Path) -> int:
    return int(path.read_text(encoding="ascii").split()[0])


def _read_key(path: Path, key: str) -> int:
    for line in path.read_text(encoding="ascii").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


@functools.cache
def cgroup_version() -> Isolation:
    """Which cgroup this node can give each run (probed once, by making and removing one)."""
    if os.geteuid() != 0:
        return "rlimits_only"
    try:
        own, mounts = _own_cgroups(), _mounts()
        if all(c in mounts and c in own for c in _V1_CONTROLLERS):
            version: Isolation = "cgroup_v1"
        elif "" in mounts and "" in own:
            version = "cgroup_v2"
        else:
            return "rlimits_only"
        probe = RunCgroup.create(version, memory_bytes=64 * 1024**2, tasks=8)
        probe.remove()
        return version
    except OSError:
        return "rlimits_only"


class RunCgroup:
    """One run's cgroup: its directories, the files the spawner joins it by, its counters."""

    def __init__(self, version: Isolation, directories: dict[str, Path]) -> None:
        self.version = version
        self.directories = directories  # controller ('' on v2) -> this run's directory

    @classmethod
    def create(cls, version: Isolation, *, memory_bytes: int, tasks: int) -> RunCgroup:
        own, mounts = _own_cgroups(), _mounts()
        name = f"cogov-room-{secrets.token_hex(8)}"
        controllers = _V1_CONTROLLERS if version == "cgroup_v1" else ("",)
        made = cls(version, {})
        try:
            for controller in controllers:
                directory = _directory(mounts, own, controller) / name
                directory.mkdir(mode=0o755)
                made.directories[controller] = directory
            if version == "cgroup_v1":
                memory = made.directories["memory"]
                _write(memory / "memory.limit_in_bytes", str(memory_bytes))
                swap = memory / "memory.memsw.limit_in_bytes"
                if swap.exists():  # only with swap accounting; must follow limit_in_bytes
                    _write(swap, str(memory_bytes))
                _write(made.directories["pids"] / "pids.max", str(tasks))
            else:
                directory = made.directories[""]
                if not (directory / "memory.peak").exists():  # Linux 5.19 on: no peak, no meter
                    raise FileNotFoundError(directory / "memory.peak")
                _write(directory / "memory.max", str(memory_bytes))
                if (directory / "memory.swap.max").exists():
                    _write(directory / "memory.swap.max", "0")
                _write(directory / "pids.max", str(tasks))
        except OSError:
            made.remove()
            raise
        return made

    @property
    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.directories.values()]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.procs_files:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in path.read_text(encoding="ascii").split())
        return found

    def kill(self) -> None:
        """SIGKILL every process in the cgroup until none is left (or the time is up)."""
        deadline = time.monotonic() + _REMOVE_SECONDS
        while (left := self.pids()) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def usage(self) -> CgroupUsage:
        if self.version == "cgroup_v1":
            memory, pids = self.directories["memory"], self.directories["pids"]
            return CgroupUsage(
                cpu_seconds=_read_int(self.directories["cpuacct"] / "cpuacct.usage") / 1e9,
                peak_memory_bytes=_read_int(memory / "memory.max_usage_in_bytes"),
                oom_kills=_read_key(memory / "memory.oom_control", "oom_kill"),
                tasks_refused=_read_key(pids / "pids.events", "max"))
        directory = self.directories[""]
        return CgroupUsage(
            cpu_seconds=_read_key(directory / "cpu.stat", "usage_usec") / 1e6,
            peak_memory_bytes=_read_int(directory / "memory.peak"),
            oom_kills=_read_key(directory / "memory.events", "oom_kill"),
            tasks_refused=_read_key(directory / "pids.events", "max"))

    def remove(self) -> None:
        self.kill()
        for directory in self.directories.values():
            with contextlib.suppress(FileNotFoundError):
                directory.rmdir()


@contextlib.contextmanager
def run_cgroup(*, memory_bytes: int, tasks: int) -> Iterator[RunCgroup | None]:
    """A fresh cgroup for one run, removed afterwards; None where the node cannot make one."""
    version = cgroup_version()
    if version == "rlimits_only":
        yield None
        return
    cgroup = RunCgroup.create(version, memory_bytes=memory_bytes, tasks=tasks)
    try:
        yield cgroup
    finally:
        cgroup.remove()
