"""Runs one algorithm package inside the sandbox. Standalone: stdlib, pyarrow, pandas.

The runner mounts this file at /harness/harness.py, the package at /pkg, the projected
inputs at /data, the job description at /job/spec.json and a writable /out. The harness
loads the inputs, then installs a seccomp filter on every thread (no new processes, no
sockets, no namespace or ptrace tricks), and only then imports the package's code.
It writes /out/output.parquet and /out/status.json.
"""

from __future__ import annotations

import ctypes
import json
import platform
import resource
import struct
import sys
import time
import traceback

# classic BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h)
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_KILL_PROCESS = 0x80000000
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_EPERM, _EACCES, _ENOSYS = 1, 13, 38
_CLONE_THREAD = 0x00010000
_X32_SYSCALL_BIT = 0x40000000

# (audit arch, seccomp syscall number, {name: number}) per machine.
_ARCHES = {
    "x86_64": (0xC000003E, 317, {
        "execve": 59, "execveat": 322, "fork": 57, "vfork": 58, "clone": 56,
        "clone3": 435, "socket": 41, "socketpair": 53, "ptrace": 101, "mount": 165,
        "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
        "bpf": 321, "perf_event_open": 298, "keyctl": 250, "add_key": 248,
        "request_key": 249, "userfaultfd": 323, "process_vm_readv": 310,
        "process_vm_writev": 311, "kexec_load": 246, "init_module": 175,
        "finit_module": 313,
    }),
    "aarch64": (0xC00000B7, 277, {
        "execve": 221, "execveat": 281, "clone": 220, "clone3": 435, "socket": 198,
        "socketpair": 199, "ptrace": 117, "mount": 40, "umount2": 39, "pivot_root": 41,
        "chroot": 51, "unshare": 97, "setns": 268, "bpf": 280, "perf_event_open": 241,
        "keyctl": 219, "add_key": 217, "request_key": 218, "userfaultfd": 282,
        "process_vm_readv": 270, "process_vm_writev": 271, "kexec_load": 104,
        "init_module": 105, "finit_module": 273,
    }),
}
_DENIED = {
    # glibc falls back to clone() when clone3 says ENOSYS; clone() is then filtered by flags.
    "clone3": _ENOSYS, "socket": _EACCES, "socketpair": _EACCES,
}


def _stmt(code: int, k: int) -> bytes:
    return struct.pack("HBBI", code, 0, 0, k)


def _jump(code: int, k: int, jt: int, jf: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def seccomp_program(machine: str) -> bytes:
    """The BPF filter: deny process creation, sockets and kernel-surface syscalls."""
    audit_arch, _, numbers = _ARCHES[machine]
    prog = [_stmt(_LD_W_ABS, 4), _jump(_JEQ_K, audit_arch, 1, 0), _stmt(_RET_K, _RET_KILL_PROCESS),
            _stmt(_LD_W_ABS, 0)]
    if machine == "x86_64":
        prog += [_jump(_JGE_K, _X32_SYSCALL_BIT, 0, 1), _stmt(_RET_K, _RET_KILL_PROCESS)]
    for name, number in numbers.items():
        if name == "clone":
            continue
        errno = _DENIED.get(name, _EPERM)
        prog += [_jump(_JEQ_K, number, 0, 1), _stmt(_RET_K, _RET_ERRNO | errno)]
    # clone(): threads (CLONE_THREAD in the flags, args[0] low word) yes, processes no.
    prog += [_jump(_JEQ_K, numbers["clone"], 0, 3), _stmt(_LD_W_ABS, 16),
             _jump(_JSET_K, _CLONE_THREAD, 1, 0), _stmt(_RET_K, _RET_ERRNO | _EPERM),
             _stmt(_RET_K, _RET_ALLOW)]
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp() -> None:
    """Install the filter on all threads of this process (TSYNC), irrevocably."""
    machine = platform.machine()
    if machine not in _ARCHES:
        raise OSError(f"no seccomp filter for machine {machine!r}")
    _, seccomp_nr, _ = _ARCHES[machine]
    program = seccomp_program(machine)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    # seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &fprog)
    result = libc.syscall(seccomp_nr, 1, 1, ctypes.byref(fprog))
    if result != 0:
        raise OSError(ctypes.get_errno(), f"seccomp filter not installed (result {result})")


def _write_status(out: str, status: dict) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    status["maxrss_kb"] = usage.ru_maxrss
    status["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    with open(f"{out}/status.json", "w", encoding="utf-8") as handle:
        json.dump(status, handle)


def main() -> int:
    out = "/out"
    started = time.monotonic()
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with open("/job/spec.json", encoding="utf-8") as handle:
            spec = json.load(handle)
        tables = {name: pq.read_table(path).to_pandas() for name, path in spec["inputs"].items()}
        install_seccomp()
    except BaseException as exc:
        traceback.print_exc()
        _write_status(out, {"ok": False, "stage": "setup", "error_type": type(exc).__name__,
                            "error": str(exc)[:2000]})
        return 70
    stage = "import"
    try:
        sys.dont_write_bytecode = True
        sys.path.insert(0, "/pkg")
        module_name, function_name = spec["entry_point"].split(":")
        module = __import__(module_name, fromlist=[function_name])
        entry = getattr(module, function_name)
        stage = "run"
        result = entry(tables)
        stage = "output"
        import pandas as pd

        if not isinstance(result, pd.DataFrame):
            raise TypeError(f"entry point returned {type(result).__name__}, not a DataFrame")
        pq.write_table(pa.Table.from_pandas(result, preserve_index=False),
                       f"{out}/output.parquet")
    except BaseException as exc:
        traceback.print_exc()
        _write_status(out, {"ok": False, "stage": stage, "error_type": type(exc).__name__,
                            "error": str(exc)[:2000],
                            "memory_error": isinstance(exc, MemoryError),
                            "seconds": time.monotonic() - started})
        return 1
    _write_status(out, {"ok": True, "stage": "done", "rows": len(result),
                        "seconds": time.monotonic() - started})
    return 0


if __name__ == "__main__":
    sys.exit(main())
