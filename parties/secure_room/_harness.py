"""Runs inside the sandbox. Standalone: stdlib, pyarrow, pandas.

Two jobs, each in a sandbox of its own:
- `run` (the default): the runner mounts this file at /harness/harness.py, the package
  at /pkg, the projected inputs at /data, the job description at /job/spec.json and a
  writable /out. bwrap has already installed the seccomp filter without exec; the harness
  loads the inputs, adds the filter with exec, and only then imports the package's code.
  It writes /out/output.parquet.
- `parse`: reads a package's output (/in/output.parquet, copied there by the node),
  refuses what is not a flat table of plain columns or has too many rows, and writes
  /out/output.json, one list of values per column. The node never parses a package's
  parquet itself, so a decompression or dictionary bomb costs this sandbox, not the node.

The exit code is the harness's only account; the node trusts no file the package could
have written, and measures time and memory itself.
"""

from __future__ import annotations

import ctypes
import json
import platform
import struct
import sys
import traceback

EXIT_OK, EXIT_PACKAGE_ERROR, EXIT_OUTPUT_REFUSED, EXIT_MEMORY, EXIT_SETUP = 0, 1, 2, 3, 70

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

# Numbered alike on every architecture (the unified table from 424 on).
_COMMON = {
    "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_open": 434, "clone3": 435,
    "pidfd_getfd": 438, "process_madvise": 440, "mount_setattr": 442, "process_mrelease": 448,
}
# (audit arch, seccomp syscall number, {name: number}) per machine.
_ARCHES = {
    "x86_64": (0xC000003E, 317, {
        "execve": 59, "execveat": 322, "fork": 57, "vfork": 58, "clone": 56,
        "socket": 41, "socketpair": 53, "ptrace": 101, "mount": 165,
        "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
        "bpf": 321, "perf_event_open": 298, "keyctl": 250, "add_key": 248,
        "request_key": 249, "userfaultfd": 323, "process_vm_readv": 310,
        "process_vm_writev": 311, "kexec_load": 246, "init_module": 175,
        "finit_module": 313, "kcmp": 312, "name_to_handle_at": 303, "open_by_handle_at": 304,
        **_COMMON,
    }),
    "aarch64": (0xC00000B7, 277, {
        "execve": 221, "execveat": 281, "clone": 220, "socket": 198,
        "socketpair": 199, "ptrace": 117, "mount": 40, "umount2": 39, "pivot_root": 41,
        "chroot": 51, "unshare": 97, "setns": 268, "bpf": 280, "perf_event_open": 241,
        "keyctl": 219, "add_key": 217, "request_key": 218, "userfaultfd": 282,
        "process_vm_readv": 270, "process_vm_writev": 271, "kexec_load": 104,
        "init_module": 105, "finit_module": 273, "kcmp": 272, "name_to_handle_at": 264,
        "open_by_handle_at": 265, **_COMMON,
    }),
}
_EXEC = ("execve", "execveat")
_DENIED = {
    # glibc falls back to clone() when clone3 says ENOSYS; clone() is then filtered by flags.
    "clone3": _ENOSYS, "socket": _EACCES, "socketpair": _EACCES,
}


def _stmt(code: int, k: int) -> bytes:
    return struct.pack("HBBI", code, 0, 0, k)


def _jump(code: int, k: int, jt: int, jf: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def seccomp_program(machine: str, *, exec_allowed: bool) -> bytes:
    """The BPF filter: deny process creation, sockets and kernel-surface syscalls.

    bwrap installs it with `exec_allowed` (it must still execute the harness); the
    harness adds it without, before the package's code runs. Filters stack, so the
    stricter one holds from then on.
    """
    audit_arch, _, numbers = _ARCHES[machine]
    prog = [_stmt(_LD_W_ABS, 4), _jump(_JEQ_K, audit_arch, 1, 0), _stmt(_RET_K, _RET_KILL_PROCESS),
            _stmt(_LD_W_ABS, 0)]
    if machine == "x86_64":
        prog += [_jump(_JGE_K, _X32_SYSCALL_BIT, 0, 1), _stmt(_RET_K, _RET_KILL_PROCESS)]
    for name, number in numbers.items():
        if name == "clone" or (exec_allowed and name in _EXEC):
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
    """Add the exec-denying filter on all threads of this process (TSYNC), irrevocably."""
    machine = platform.machine()
    _, seccomp_nr, _ = _ARCHES[machine]
    program = seccomp_program(machine, exec_allowed=False)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    # seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &fprog)
    result = libc.syscall(seccomp_nr, 1, 1, ctypes.byref(fprog))
    if result != 0:
        raise OSError(ctypes.get_errno(), f"seccomp filter not installed (result {result})")


def run_package() -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with open("/job/spec.json", encoding="utf-8") as handle:
            spec = json.load(handle)
        tables = {name: pq.read_table(path).to_pandas() for name, path in spec["inputs"].items()}
        install_seccomp()
    except BaseException:
        traceback.print_exc()
        return EXIT_SETUP
    try:
        sys.dont_write_bytecode = True
        sys.path.insert(0, "/pkg")
        module_name, function_name = spec["entry_point"].split(":")
        module = __import__(module_name, fromlist=[function_name])
        result = getattr(module, function_name)(tables)
        import pandas as pd

        if not isinstance(result, pd.DataFrame):
            raise TypeError(f"entry point returned {type(result).__name__}, not a DataFrame")
        pq.write_table(pa.Table.from_pandas(result, preserve_index=False),
                       "/out/output.parquet")
    except MemoryError:
        traceback.print_exc()
        return EXIT_MEMORY
    except BaseException:
        traceback.print_exc()
        return EXIT_PACKAGE_ERROR
    return EXIT_OK


def _column_kind(kind: object) -> str | None:
    import pyarrow as pa

    checks = (("bool", pa.types.is_boolean), ("int64", pa.types.is_integer),
              ("float64", pa.types.is_floating), ("string", pa.types.is_string),
              ("string", pa.types.is_large_string), ("decimal", pa.types.is_decimal),
              ("date", pa.types.is_date), ("timestamp", pa.types.is_timestamp))
    return next((name for name, check in checks if check(kind)), None)


def _json_value(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def parse_output(max_rows: int) -> int:
    try:
        import pyarrow.parquet as pq

        install_seccomp()
        source = pq.ParquetFile("/in/output.parquet")
        if source.metadata.num_rows > max_rows:
            print(f"output has {source.metadata.num_rows} rows, over the cap", file=sys.stderr)
            return EXIT_OUTPUT_REFUSED
        columns = []
        for field in source.schema_arrow:
            kind = _column_kind(field.type)
            if kind is None:
                print(f"unsupported column type {field.type}", file=sys.stderr)
                return EXIT_OUTPUT_REFUSED
        table = source.read()
        for field, column in zip(table.schema, table.columns, strict=True):
            columns.append({"name": field.name, "kind": _column_kind(field.type),
                            "values": [_json_value(v) for v in column.to_pylist()]})
        with open("/out/output.json", "w", encoding="utf-8") as handle:
            json.dump({"rows": table.num_rows, "columns": columns}, handle)
    except MemoryError:
        traceback.print_exc()
        return EXIT_MEMORY
    except BaseException:
        traceback.print_exc()
        return EXIT_OUTPUT_REFUSED
    return EXIT_OK


def main(argv: list[str]) -> int:
    if argv[:1] == ["parse"]:
        return parse_output(int(argv[1]))
    return run_package()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
