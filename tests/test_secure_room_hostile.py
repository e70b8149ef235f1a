"""The secure room against hostile packages that would pass review: each attack is stopped,
the test names the layer that stopped it, and the developer's view carries no data.

Layers: the unprivileged host uid and the read-only /proc (kernel settings), the seccomp
filter bwrap installs before the harness becomes pid 1 (io_uring, pidfd, ptrace,
process_vm), the node's untrusting read of /out (no links, regular files, size caps,
parsing in a second sandbox), outcome codes in place of text (stderr, exceptions,
column names), the run's cgroup (memory with the tmpfs pages, tasks), the size caps of
/tmp and /out, the verdict's shape (one row per input claim, declared columns,
tolerances) and the row-level cap the owner signs.
Most packages run with the static gate off, so what stops them is never the AST checker.
"""

import ctypes
import json
import math
import os
import platform
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from governance.packages import PackageNotApproved, approve_package, check_package
from governance.synthetic import write_library
from parties.secure_room.approval import power_of_two_class
from parties.secure_room.cgroup import cgroup_version
from parties.secure_room.cli import package_app as app
from parties.secure_room.room import PackageRun, run_package
from parties.secure_room.sandbox import HOST_UID, SANDBOX_UID, SandboxLimits, sandbox_available
from tests.test_secure_room import FAST, MANIFEST, harness_pids, make_package, visits_table

NATIONAL_IDS = MANIFEST.replace('columns = ["hospital_id", "total_fen"]',
                                'columns = ["hospital_id", "national_id"]')
AUTHORIZED = NATIONAL_IDS.replace('libraries = ["sample", "test"]',
                                  'libraries = ["sample", "authorized"]')


@pytest.fixture(scope="module")
def libraries(tmp_path_factory) -> dict[str, object]:
    sandbox_available()
    root = tmp_path_factory.mktemp("hostile")
    visits = visits_table({"hospital-1": 40, "hospital-2": 25, "hospital-3": 4})
    claims = pd.DataFrame({"claim_id": [f"CLM-{i:04d}" for i in range(12)],
                           "national_id": visits["national_id"][:12].tolist()})
    tables = {"visits": visits, "claims": claims}
    write_library(root / "sample", "sample", tables)
    write_library(root / "authorized", "authorized", tables)
    return {"sample": root / "sample", "authorized": root / "authorized",
            "ids": sorted(visits["national_id"]), "claim_ids": sorted(claims["claim_id"]),
            "root": root}


def facts(run: PackageRun) -> dict[str, str]:
    assert run.report.outcome == "ok", run.report
    return dict(r["hospital_id"].split("=", 1) for r in run.output)


def developer_view(run: PackageRun) -> str:
    """Everything the developer and the CLI are given: the run as the node serializes it."""
    return run.model_dump_json()


# --- 1. the unprivileged sandbox ------------------------------------------------------------

KERNEL_PROBES = """\
import ctypes
import errno
import os
import platform
import time

import pandas as pd

TABLE = {{"x86_64": {{"ptrace": 101, "process_vm_readv": 310, "unshare": 272}},
         "aarch64": {{"ptrace": 117, "process_vm_readv": 270, "unshare": 97}}}}
NUMBERS = TABLE[platform.machine()]
libc = ctypes.CDLL(None, use_errno=True)


def syscall(number, *args):
    result = libc.syscall(number, *args)
    return "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()]


def write(path):
    try:
        with open(path, "w") as handle:
            handle.write("1")
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]


def run(tables):
    params = ctypes.create_string_buffer(120)
    with open("/proc/1/cmdline", "rb") as handle:
        pid1 = handle.read().replace(b"\\0", b" ").decode()
    with open("/proc/1/status") as handle:
        status = dict(line.split(":", 1) for line in handle.read().splitlines())
    with open("/proc/self/uid_map") as handle:
        uid_map = " ".join(handle.read().split())
    found = {{
        "printk_ratelimit": write("/proc/sys/kernel/printk_ratelimit"),
        "core_pattern": write("/proc/sys/kernel/core_pattern"),
        "pid1_mem": write("/proc/1/mem"),
        "pid1": pid1,
        "pid1_seccomp": status["Seccomp"].strip(),
        "pid1_filters": status["Seccomp_filters"].strip(),
        "uid_map": uid_map,
        "io_uring_setup": syscall(425, 8, params),
        "pidfd_open": syscall(434, 1, 0),
        "pidfd_getfd": syscall(438, 3, 0, 0),
        "ptrace": syscall(NUMBERS["ptrace"], 0, 0, 0, 0),
        "process_vm_readv": syscall(NUMBERS["process_vm_readv"], 1, 0, 0, 0, 0, 0),
        "unshare_user": syscall(NUMBERS["unshare"], 0x10000000),
        "mountinfo": open("/proc/self/mountinfo").read().replace("\\n", "|"),
    }}
    time.sleep(1.0)  # for the host to look at this process
    return pd.DataFrame({{"hospital_id": [f"{{k}}={{v}}" for k, v in found.items()]}})
"""


def test_kernel_settings_pid1_io_uring_and_ptrace_are_stopped(tmp_path, libraries):
    pkg = make_package(tmp_path / "p", KERNEL_PROBES.format())
    before, host_uids = harness_pids(), set()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(run_package, pkg, libraries["sample"], limits=FAST,
                             static_checks=False)
        while not future.done():
            for pid in harness_pids() - before:
                try:  # the harness itself, not the spawner, prlimit or setpriv before bwrap
                    with open(f"/proc/{pid}/cmdline", "rb") as handle:
                        argv = handle.read().split(b"\0")
                        if argv[0] != sys.executable.encode() or b"-c" in argv:
                            continue
                    with open(f"/proc/{pid}/status") as handle:
                        host_uids |= {line.split()[1] for line in handle
                                      if line.startswith(("Uid:", "Gid:"))}
                except OSError:
                    continue
            time.sleep(0.05)
        seen = facts(future.result())
    # Kernel settings: a fresh /proc remounted read-only, and the sandbox's uid maps to the
    # unprivileged host uid, not to root.
    assert seen["printk_ratelimit"] == seen["core_pattern"] == "EROFS"
    assert host_uids == {str(HOST_UID)}  # as the host sees the sandboxed process
    assert seen["uid_map"].split()[0] == str(SANDBOX_UID)
    # pid 1 is the harness itself, filtered by bwrap before exec, and then by the harness:
    # there is no unfiltered init to inject into, and its /proc/1/mem is not writable.
    assert "/harness/harness.py" in seen["pid1"]
    assert seen["pid1_seccomp"] == "2" and int(seen["pid1_filters"]) >= 2
    assert seen["pid1_mem"] == "EROFS"
    # The filter: io_uring, pidfd, ptrace, process_vm and new namespaces.
    for name in ("io_uring_setup", "pidfd_open", "pidfd_getfd", "ptrace", "process_vm_readv",
                 "unshare_user"):
        assert seen[name] == "EPERM", (name, seen[name])
    # Host paths: /out and the inputs sit on the run's own tmpfs, so mountinfo shows the
    # tmpfs root, not where the node keeps the run.
    mounts = [line.split() for line in seen["mountinfo"].split("|") if line]
    by_target = {fields[4]: fields[3] for fields in mounts}
    assert by_target["/out"] == "/" and by_target["/data"] == "/data"
    assert by_target["/proc"] == "/" and not any("cogov-secure-room" in f[3] for f in mounts)
    assert "ro" in next(f[5] for f in mounts if f[4] == "/proc").split(",")


def test_the_io_uring_and_pidfd_probes_work_outside_the_sandbox():
    """Control: the same calls succeed on the host, so the sandbox's EPERM is the filter's."""
    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("probe numbers for x86_64 and aarch64 only")
    libc = ctypes.CDLL(None, use_errno=True)
    ring = libc.syscall(425, 8, ctypes.create_string_buffer(120))
    pidfd = libc.syscall(434, 1, 0)
    for fd in (ring, pidfd):
        assert fd >= 0
        os.close(fd)


# --- 2. the node trusts nothing in /out -----------------------------------------------------

LINKED_OUTPUT = """\
import json
import os
import time


def run(tables):
    deadline = time.process_time() + 0.6
    while time.process_time() < deadline:
        pass
    with open("/out/status.json", "w") as handle:
        json.dump({{"ok": True, "stage": "done", "cpu_seconds": 0.0, "maxrss_kb": 1}}, handle)
    {plant}
    os._exit(0)
"""
PLANTS = {
    "link_to_host_file": 'os.symlink("{secret}", "/out/output.parquet")',
    "link_to_missing_file": 'os.symlink("{missing}", "/out/output.parquet")',
    "fifo": 'os.mkfifo("/out/output.parquet")',
    "directory": 'os.mkdir("/out/output.parquet")',
}


def test_links_fifos_and_a_forged_status_release_nothing(tmp_path, libraries):
    secret = libraries["root"] / "host-export.parquet"
    pq.write_table(pa.table({"hospital_id": [f"SECRET-ROW-{i}" for i in range(50)]}), secret)
    reports = {}
    for name, plant in PLANTS.items():
        code = LINKED_OUTPUT.format(plant=plant.format(secret=secret,
                                                       missing=tmp_path / "absent.parquet"))
        run = run_package(make_package(tmp_path / name, code), libraries["sample"],
                          limits=FAST, static_checks=False)
        report = run.report
        # The forged status said ok with no CPU time: the node measured its own.
        assert (report.outcome, report.accepted, run.output) == ("output_refused", False, None)
        assert report.policy_decision == "OutputUnreadable"
        assert report.cpu_seconds >= 0.5
        assert "SECRET-ROW" not in developer_view(run)
        reports[name] = (report.policy_decision, report.detail)
    # A link to an existing host file and one to nothing are refused alike: no oracle.
    assert len(set(reports.values())) == 1, reports


def test_a_huge_status_and_a_decompression_bomb_do_not_grow_the_node(tmp_path, libraries):
    code = """\
    import os

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq


    def run(tables):
        with open("/out/status.json", "wb") as handle:
            for _ in range(48):
                handle.write(b"[" * 1024 * 1024)
        # 100,000 rows (the row cap) of one 1 MiB string: 1 MiB of parquet, stored as a
        # plain string column, 100 GiB once decoded.
        column = pa.DictionaryArray.from_arrays(pa.array(np.zeros(100_000, np.int32)),
                                                pa.array(["x" * 2**20]))
        pq.write_table(pa.table({"hospital_id": column}), "/out/output.parquet",
                       compression="zstd", store_schema=False)
        os._exit(0)
    """
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset this process's peak resident set (VmHWM)
    run = run_package(make_package(tmp_path / "p", code), libraries["sample"],
                      limits=SandboxLimits(cpu_seconds=20, memory_bytes=1536 * 1024**2,
                                           wall_seconds=60),
                      static_checks=False)
    with open("/proc/self/status") as handle:
        peak_kib = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM"))
    with open("/proc/self/status") as handle:
        now_kib = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS"))
    assert run.report.outcome == "output_refused"
    # The parser sandbox ran out of memory on the bomb; the node never decoded it.
    assert run.report.policy_decision == "OutputUnreadable"
    assert (peak_kib - now_kib) * 1024 < 64 * 1024**2


# --- 3. outcome codes only ------------------------------------------------------------------

LEAKS = {
    "stderr_and_exception": """\
        import sys


        def run(tables):
            ids = ",".join(tables["visits"]["national_id"])
            print(ids, file=sys.stderr)
            raise ValueError(ids)
        """,
    "exception_type": """\
        def run(tables):
            first = tables["visits"]["national_id"].iloc[0]
            raise type("Leak" + first, (Exception,), {})("see my name")
        """,
    "column_names": """\
        import pandas as pd


        def run(tables):
            ids = list(tables["visits"]["national_id"][:5])
            return pd.DataFrame({i: ["x"] for i in ids})
        """,
    "exit_code": """\
        import os


        def run(tables):
            os._exit(int(tables["visits"]["national_id"].iloc[0][-4:-1]) % 200)
        """,
}


@pytest.mark.parametrize("leak", sorted(LEAKS))
def test_a_production_report_carries_outcome_codes_only(tmp_path, libraries, leak):
    pkg = make_package(tmp_path / "p", LEAKS[leak], AUTHORIZED)
    owner = Ed25519PrivateKey.generate()
    approval = approve_package(pkg, owner, "health-authority")
    production = run_package(pkg, libraries["authorized"], limits=FAST, approval=approval,
                             owner_public_key=owner.public_key(), static_checks=False)
    view = developer_view(production)
    assert not any(national_id in view for national_id in libraries["ids"])
    report = production.report
    assert report.detail is None and report.exit_code is None and report.wall_seconds is None
    assert report.outcome in ("error", "output_refused") and not report.accepted
    if leak == "column_names":
        assert report.policy_decision == "OutputSchemaMismatch"
    # The detail stays with the node, for its log.
    assert production.diagnostics is not None and "diagnostics" not in json.loads(view)
    if leak == "stderr_and_exception":
        assert libraries["ids"][0] in production.diagnostics.stderr_tail
    if leak == "column_names":
        assert libraries["ids"][0] in production.diagnostics.policy_message

    # On the sample library the developer sees the detail, scrubbed of identifiers.
    sample = run_package(pkg, libraries["sample"], limits=FAST, static_checks=False)
    assert not any(national_id in developer_view(sample) for national_id in libraries["ids"])
    if leak in ("stderr_and_exception", "column_names"):
        assert "[identifier]" in sample.report.detail
    shown = CliRunner().invoke(app, ["test", str(pkg), "--library", str(libraries["sample"]),
                                     "--skip-static-gate"])
    assert shown.exit_code == 1
    assert not any(national_id in shown.output for national_id in libraries["ids"])


# --- 4. limits ------------------------------------------------------------------------------

LIMIT_PROBES = """\
import errno
import os
import threading

import pandas as pd


def fill(directory):
    written, chunk = 0, b"x" * (4 * 1024 * 1024)
    try:
        for i in range(1000):
            with open(f"{directory}/fill-{i}", "wb") as handle:
                handle.write(chunk)
            written += len(chunk)
    except OSError as exc:
        return f"{errno.errorcode[exc.errno]}:{written}"
    return f"ok:{written}"


def bomb():
    stop, started = threading.Event(), []
    try:
        for _ in range(5000):
            thread = threading.Thread(target=stop.wait)
            thread.start()
            started.append(thread)
    except RuntimeError as exc:
        result = f"{type(exc).__name__}:{len(started)}"
    else:
        result = f"ok:{len(started)}"
    stop.set()
    for thread in started:
        thread.join()
    return result


def run(tables):
    found = {"tmp": fill("/tmp"), "out": fill("/out"), "threads": bomb()}
    for name in os.listdir("/out"):
        os.remove(f"/out/{name}")
    return pd.DataFrame({"hospital_id": [f"{k}={v}" for k, v in found.items()]})
"""


def test_tmp_and_out_are_size_capped_and_a_thread_bomb_is_stopped(tmp_path, libraries):
    # 4 GiB of address space: each thread reserves a malloc arena, and the task cap
    # must be what stops the bomb.
    limits = SandboxLimits(cpu_seconds=10, memory_bytes=4 * 1024**3, wall_seconds=30,
                           output_bytes=16 * 1024**2, tmp_bytes=24 * 1024**2, tasks=32)
    run = run_package(make_package(tmp_path / "p", LIMIT_PROBES), libraries["sample"],
                      limits=limits, static_checks=False)
    seen = facts(run)
    # ENOSPC, not EFBIG: the tmpfs size caps stopped these, not the per-file limit.
    tmp_error, tmp_written = seen["tmp"].split(":")
    out_error, out_written = seen["out"].split(":")
    assert tmp_error == "ENOSPC" and int(tmp_written) <= limits.tmp_bytes
    assert out_error == "ENOSPC" and int(out_written) <= limits.output_bytes
    # The run's cgroup (pids.max; RLIMIT_NPROC only without one): the bomb stops under the cap.
    thread_error, threads = seen["threads"].split(":")
    assert thread_error == "RuntimeError" and 0 < int(threads) < limits.tasks
    assert run.report.isolation == cgroup_version()
    if cgroup_version() != "rlimits_only":
        assert run.diagnostics.tasks_refused > 0
        assert f"--nproc={limits.tasks}" not in run.report.sandbox_command


TMP_FILL = """\
import pandas as pd


def run(tables):
    chunk = b"x" * (4 * 1024 * 1024)
    for i in range(512):  # 2 GiB, under the /tmp size cap, over the memory limit
        with open(f"/tmp/fill-{i}", "wb") as handle:
            handle.write(chunk)
    return pd.DataFrame({"hospital_id": ["filled=" + ",".join(tables["visits"]["national_id"])]})
"""


@pytest.mark.skipif(cgroup_version() == "rlimits_only",
                    reason="needs a cgroup: without one, /tmp is bounded by its size only")
def test_a_tmp_fill_beyond_the_memory_limit_is_stopped_by_the_cgroup(tmp_path, libraries):
    limits = SandboxLimits(cpu_seconds=20, memory_bytes=768 * 1024**2, wall_seconds=60,
                           tmp_bytes=4 * 1024**3)
    before = _run_cgroups()
    run = run_package(make_package(tmp_path / "p", TMP_FILL, NATIONAL_IDS),
                      libraries["sample"], limits=limits, static_checks=False)
    # tmpfs pages are charged to the writer's cgroup: the kernel killed the run at the
    # memory limit, not the /tmp cap (ENOSPC) and not the address space (MemoryError).
    assert run.report.outcome == "memory_limit" and run.output is None
    assert run.diagnostics.oom_kills >= 1 and run.report.signal == 9
    assert run.report.peak_memory_bytes <= limits.memory_bytes
    assert run.report.isolation == cgroup_version()
    view = developer_view(run)
    assert not any(national_id in view for national_id in libraries["ids"])
    # Removed with the run. Another process's concurrent run (a second test session on the
    # machine) may hold a cgroup of its own for a while: wait it out, within its wall limit.
    deadline = time.monotonic() + 90
    while _run_cgroups() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _run_cgroups() - before


def _run_cgroups() -> set[Path]:
    return set(Path("/sys/fs/cgroup").rglob("cogov-room-*"))


# --- 5. the gate cannot be shadowed ---------------------------------------------------------


def test_a_package_module_that_shadows_os_or_pandas_is_refused(tmp_path, libraries):
    code = """\
    import os

    import pandas as pd


    def run(tables):
        return pd.DataFrame({"hospital_id": [os.getcwd()]})
    """
    pkg = make_package(tmp_path / "p", code)
    (pkg / "os.py").write_text("def getcwd():\n    return 'harmless'\n")
    (pkg / "pandas").mkdir()
    (pkg / "pandas" / "__init__.py").write_text("")
    shadowed = {f.file for f in check_package(pkg) if f.code == "shadowed_module"}
    assert shadowed == {"os.py", "pandas/__init__.py"}
    run = run_package(pkg, libraries["sample"], limits=FAST)
    assert (run.report.outcome, run.report.ran) == ("static_checks_failed", False)


# --- 6. the output policy does not trust the package's encoding ----------------------------


def test_ids_as_numbers_or_transformed_text_are_refused_in_the_room(tmp_path, libraries):
    manifest = NATIONAL_IDS + '\n[[output.columns]]\nname = "n"\ntype = "int64"\n'
    code = """\
    import pandas as pd


    def run(tables):
        ids = tables["visits"]["national_id"]
        return pd.DataFrame({"hospital_id": [i[::-1] for i in ids],
                             "n": [int(i[:17]) for i in ids]})
    """
    run = run_package(make_package(tmp_path / "p", code, manifest), libraries["sample"],
                      limits=FAST)
    assert (run.report.outcome, run.report.policy_decision) == (
        "output_refused", "IdentifierInOutput")
    view = developer_view(run)
    assert not any(i in view or i[::-1] in view for i in libraries["ids"])


def test_a_lie_about_group_counts_does_not_release_a_small_group(tmp_path, libraries):
    pkg = tmp_path / "agg"
    assert CliRunner().invoke(app, ["init", str(pkg), "--name", "liar"]).exit_code == 0
    module = pkg / "liar.py"
    module.write_text(module.read_text().replace(
        'return grouped[["hospital_id", "n", "total_fen"]]',
        'grouped["n"] = grouped["n"].clip(lower=10)\n'
        '    invented = pd.DataFrame({"hospital_id": ["hospital-9"], "n": [50],\n'
        '                             "total_fen": [1]})\n'
        '    return pd.concat([grouped, invented])[["hospital_id", "n", "total_fen"]]'))
    run = run_package(pkg, libraries["sample"], limits=FAST)
    assert run.report.outcome == "ok" and run.report.accepted, run.report
    # hospital-3 has 4 visits but claims 10; hospital-9 is in no input: both suppressed
    # on the room's own counts.
    assert sorted(r["hospital_id"] for r in run.output) == ["hospital-1", "hospital-2"]
    assert run.report.suppressed_groups == 2


# rev19: the package chooses how many groups get suppressed (invented keys measure 0), so
# the count would carry log2(rows) bits of anything it read, under a clean-looking output.
COUNT_CHANNEL = """\
import pandas as pd


def run(tables):
    v = tables["visits"]
    g = v.groupby("hospital_id", as_index=False).agg(n=("national_id", "size"))
    secret = int(v["national_id"].iloc[37][-4:-1])
    fake = pd.DataFrame({"hospital_id": [f"h-{i}" for i in range(secret)], "n": [10] * secret})
    out = pd.concat([g, fake])
    out["n"] = out["n"].astype("int64")
    return out[["hospital_id", "n"]]
"""


def test_the_suppressed_group_count_stays_with_the_owner(tmp_path, libraries):
    manifest = AUTHORIZED.replace('disclosure = "model"',
                                  'disclosure = "aggregate"\ncount_column = "n"') + (
        '\n[[output.columns]]\nname = "n"\ntype = "int64"\n')
    pkg = make_package(tmp_path / "p", COUNT_CHANNEL, manifest)
    owner = Ed25519PrivateKey.generate()
    run = run_package(pkg, libraries["authorized"], limits=FAST,
                      approval=approve_package(pkg, owner, "health-authority"),
                      owner_public_key=owner.public_key())
    assert run.report.outcome == "ok" and run.report.accepted, run.report
    assert sorted(r["hospital_id"] for r in run.output) == ["hospital-1", "hospital-2"]
    assert run.report.suppressed_groups is None
    assert json.loads(developer_view(run))["report"]["suppressed_groups"] is None
    # 37 invented groups and hospital-3's 4 visits: known to the node's log only.
    assert run.diagnostics.suppressed_groups == 37 + 1


# rev19: a package sets its cgroup peak memory at will; the public PACKAGE_RUN entry has
# only its power-of-two class (as it has of CPU and wall time), not the KiB.
MEMORY_CHANNEL = """\
import pandas as pd


def run(tables):
    v = tables["visits"]
    secret = int(v["national_id"].iloc[%d][-3:-1])
    blob = bytearray((90 + 2 * secret) * 1024 * 1024)
    for i in range(0, len(blob), 4096):
        blob[i] = 1
    return pd.DataFrame({"hospital_id": ["x"]})
"""


def test_the_published_peak_memory_is_a_coarse_class(tmp_path, libraries):
    limits = SandboxLimits(cpu_seconds=20, memory_bytes=1024**3, wall_seconds=60)
    peaks = {}
    for row in (0, 17):   # secrets 00 and 17
        pkg = make_package(tmp_path / f"p{row}", MEMORY_CHANNEL % row, NATIONAL_IDS)
        run = run_package(pkg, libraries["sample"], limits=limits, static_checks=False)
        assert run.report.outcome == "ok", run.report
        peaks[row] = run.diagnostics.peak_memory_bytes // 1024
    assert peaks[17] - peaks[0] >= 30 * 1024                  # the node's own figure differs
    assert power_of_two_class(peaks[0]) == power_of_two_class(peaks[17])   # the public one not


def test_outputs_over_the_row_cap_are_refused(tmp_path, libraries):
    code = """\
    import pandas as pd


    def run(tables):
        return pd.DataFrame({"hospital_id": [f"row-{i}" for i in range(1001)]})
    """
    limits = SandboxLimits(cpu_seconds=10, memory_bytes=1024**3, wall_seconds=30,
                           output_rows=1000)
    run = run_package(make_package(tmp_path / "p", code), libraries["sample"], limits=limits)
    assert (run.report.outcome, run.report.policy_decision) == (
        "output_refused", "OutputUnreadable")


# --- 7. a verdict is one row per input claim: no room for bits beyond its columns ----------

VERDICT_MANIFEST = """\
name = "spread"
version = "0.1.0"
entry_point = "main:run"

[[inputs]]
name = "claims"
dataset = "claims"
libraries = ["sample", "authorized"]
columns = ["claim_id", "national_id"]

[output]
disclosure = "verdict"

[[output.columns]]
name = "claim_id"
type = "string"

[[output.columns]]
name = "visit_found"
type = "bool"

[[output.columns]]
name = "payable"
type = "decimal"
scale = 2
tolerance = "{tolerance}"
maximum = "1000.00"
"""

# Each package spreads the national id of a claim's person over what a verdict releases.
SPREADS = {
    "bits_in_extra_boolean_columns": ("VerdictColumnsMismatch", """\
        import pandas as pd


        def run(tables):
            claims = tables["claims"]
            frame = pd.DataFrame({"claim_id": claims["claim_id"],
                                  "visit_found": True, "payable": [Decimal("1.00")] * len(claims)})
            for bit in range(64):
                frame[f"b{bit}"] = [bool(int(i[:17]) >> bit & 1) for i in claims["national_id"]]
            return frame
        """),
    "bits_in_extra_rows": ("VerdictRowsMismatch", """\
        import pandas as pd


        def run(tables):
            rows, claims = [], tables["claims"]
            for claim, person in zip(claims["claim_id"], claims["national_id"]):
                for bit in range(64):
                    rows.append({"claim_id": claim, "payable": Decimal(bit),
                                 "visit_found": bool(int(person[:17]) >> bit & 1)})
            return pd.DataFrame(rows)
        """),
    "bits_in_invented_claim_ids": ("VerdictRowsMismatch", """\
        import pandas as pd


        def run(tables):
            ids = tables["claims"]["national_id"]
            return pd.DataFrame({"claim_id": [f"C{int(i[:17]) ^ 0x5A5A5A:x}" for i in ids],
                                 "visit_found": True, "payable": [Decimal("1.00")] * len(ids)})
        """),
    "bits_in_a_dropped_claim": ("VerdictRowsMismatch", """\
        import pandas as pd


        def run(tables):
            claims = tables["claims"]
            keep = [int(i[-2]) % 2 == 0 for i in claims["national_id"]]  # presence is a bit
            kept = claims[keep]
            return pd.DataFrame({"claim_id": kept["claim_id"], "visit_found": True,
                                 "payable": [Decimal("1.00")] * len(kept)})
        """),
    "bits_in_the_cents_below_the_tolerance": (None, """\
        import pandas as pd


        def run(tables):
            claims = tables["claims"]
            cents = [Decimal(int(i[-4:-1]) % 100) / 100 for i in claims["national_id"]]
            return pd.DataFrame({"claim_id": claims["claim_id"], "visit_found": True,
                                 "payable": [Decimal("7") + c for c in cents]})
        """),
}


@pytest.mark.parametrize("spread", sorted(SPREADS))
def test_an_id_spread_over_verdict_columns_or_rows_is_refused(tmp_path, libraries, spread):
    decision, code = SPREADS[spread]
    manifest = VERDICT_MANIFEST.format(tolerance="1.00")
    pkg = make_package(tmp_path / "p", "from decimal import Decimal\n" + textwrap.dedent(code),
                       manifest)
    run = run_package(pkg, libraries["sample"], limits=FAST, static_checks=False)
    view = developer_view(run)
    assert not any(national_id in view for national_id in libraries["ids"])
    if decision is None:
        # Within the declared shape: the amount is released at its tolerance, a whole yuan,
        # so the cents that carried the digits are gone; a claim carries at most the
        # declared capacity: 1 bit for the boolean, log2(1001) for the bounded amount.
        assert run.report.outcome == "ok", run.report
        assert {r["payable"] for r in run.output} == {"7.00"}
        assert run.report.bits_per_claim == pytest.approx(1 + math.log2(1001))
        return
    # The verdict shape stopped it (the policy, not the gate: the gate was off).
    assert (run.report.outcome, run.report.policy_decision) == ("output_refused", decision)
    assert run.output is None


def test_the_verdict_released_is_keyed_by_exactly_the_claims_handed_in(tmp_path, libraries):
    code = """\
    import pandas as pd
    from decimal import Decimal


    def run(tables):
        claims = tables["claims"]
        return pd.DataFrame({"claim_id": claims["claim_id"][::-1], "visit_found": True,
                             "payable": [Decimal("12.34")] * len(claims)})
    """
    pkg = make_package(tmp_path / "p", code, VERDICT_MANIFEST.format(tolerance="0.01"))
    run = run_package(pkg, libraries["sample"], limits=FAST)
    assert run.report.outcome == "ok" and run.report.accepted, run.report
    # Released in claim-id order, not in the (reversed) order the package wrote.
    assert [r["claim_id"] for r in run.output] == libraries["claim_ids"]


# rev19: with n claims, the order of a verdict's rows would carry log2(n!) bits (28.8 for
# 12 claims), far beyond bits_per_claim. This package writes a person's birth date as a
# permutation of the claim ids (a Lehmer code) in an otherwise honest-looking verdict.
ORDER_CODE = """import pandas as pd
from decimal import Decimal


def run(tables):
    claims = tables["claims"]
    pool = sorted(claims["claim_id"])
    secret = int(claims["national_id"].iloc[0][6:14])
    order = []
    for k in range(len(pool), 0, -1):
        f = 1
        for j in range(1, k):
            f *= j
        digit, secret = divmod(secret, f)
        order.append(pool.pop(digit))
    return pd.DataFrame({"claim_id": order, "visit_found": True,
                         "payable": [Decimal("12.34")] * len(order)})
"""


def lehmer_decode(order: list[str]) -> int:
    pool, secret = sorted(order), 0
    for position, claim in enumerate(order):
        digit = pool.index(claim)
        pool.pop(digit)
        secret += digit * math.factorial(len(order) - 1 - position)
    return secret


def test_the_verdict_row_order_carries_nothing(tmp_path, libraries):
    pkg = make_package(tmp_path / "p", ORDER_CODE, VERDICT_MANIFEST.format(tolerance="0.01"))
    owner = Ed25519PrivateKey.generate()
    run = run_package(pkg, libraries["authorized"], limits=FAST,
                      approval=approve_package(pkg, owner, "health-authority"),
                      owner_public_key=owner.public_key())        # static gate on
    assert run.report.outcome == "ok" and run.report.accepted, run.report
    order = [r["claim_id"] for r in run.output]
    birth = int(libraries["ids"][0][6:14])
    assert 0 < birth < math.factorial(len(order))   # the permutation could hold it
    assert order == libraries["claim_ids"] and lehmer_decode(order) == 0 != birth


# --- 8. row-level output is capped by the contract the owner signed -------------------------

ROW_LEVEL = AUTHORIZED.replace('disclosure = "model"', 'disclosure = "model"\nrow_level = true')
ROWS = """\
import pandas as pd


def run(tables):
    return pd.DataFrame({"hospital_id": [f"row-{i}" for i in range(12)]})
"""


def test_row_level_output_is_capped_by_the_signed_approval(tmp_path, libraries):
    pkg = make_package(tmp_path / "p", ROWS, ROW_LEVEL)
    owner = Ed25519PrivateKey.generate()

    def production(approval):
        return run_package(pkg, libraries["authorized"], limits=FAST, approval=approval,
                           owner_public_key=owner.public_key())

    uncapped = production(approve_package(pkg, owner, "health-authority"))
    assert uncapped.report.policy_decision == "RowLevelOutputRefused"
    capped = approve_package(pkg, owner, "health-authority", row_level_max_rows=10)
    over = production(capped)
    assert (over.report.policy_decision, over.output) == ("RowCapExceeded", None)
    # The requester raises the cap in the approval it holds: the signature no longer holds.
    with pytest.raises(PackageNotApproved):
        production(capped.model_copy(update={"row_level_max_rows": 1000}))
    enough = approve_package(pkg, owner, "health-authority", row_level_max_rows=12)
    released = production(enough)
    assert released.report.outcome == "ok" and len(released.output) == 12
    # On the test tiers the caller's contract cap applies; none means none allowed.
    assert run_package(pkg, libraries["sample"], limits=FAST).report.policy_decision == (
        "RowLevelOutputRefused")
    assert run_package(pkg, libraries["sample"], limits=FAST,
                       row_level_max_rows=11).report.policy_decision == "RowCapExceeded"


# rev19: a package that does not declare row_level would release one row per visit -- birth
# date (from the national id), hospital, admission date, fee -- as a "model".
PER_VISIT_MODEL = """\
name = "rows"
version = "0.1.0"
entry_point = "main:run"

[[inputs]]
name = "visits"
dataset = "visits"
libraries = ["sample", "authorized"]
columns = ["hospital_id", "national_id", "total_fen", "admission_date"]

[output]
disclosure = "model"

[[output.columns]]
name = "hospital_id"
type = "string"

[[output.columns]]
name = "birth"
type = "date"

[[output.columns]]
name = "admitted"
type = "date"

[[output.columns]]
name = "fee"
type = "int64"
"""

PER_VISIT_CODE = """\
import datetime as dt
import pandas as pd


def run(tables):
    v = tables["visits"]
    birth = [dt.date(int(i[6:10]), int(i[10:12]), int(i[12:14])) for i in v["national_id"]]
    return pd.DataFrame({"hospital_id": v["hospital_id"], "birth": birth,
                         "admitted": v["admission_date"], "fee": v["total_fen"].astype("int64")})
"""


def test_per_visit_rows_do_not_pass_as_a_model(tmp_path, libraries):
    pkg = make_package(tmp_path / "p", PER_VISIT_CODE, PER_VISIT_MODEL)
    owner = Ed25519PrivateKey.generate()

    def production(**cap):
        return run_package(pkg, libraries["authorized"], limits=FAST,
                           approval=approve_package(pkg, owner, "health-authority", **cap),
                           owner_public_key=owner.public_key())

    refused = production()            # an approval that signs no cap: MODEL_MAX_ROWS
    assert (refused.report.outcome, refused.report.policy_decision, refused.output) == (
        "output_refused", "RowCapExceeded", None)
    # Only the owner's signature raises the cap, knowingly, to the rows it will release.
    released = production(row_level_max_rows=69)
    assert released.report.outcome == "ok" and len(released.output) == 69
