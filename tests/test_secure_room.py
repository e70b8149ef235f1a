"""The secure room: hostile packages are stopped by the OS sandbox itself; outputs are policed.

Most hostile packages run with the static gate off, so what stops them is the sandbox
(namespaces, mounts, seccomp, rlimits, wall clock), not the AST checker. One passes the
checker honestly (a construct it cannot see) and is still stopped.
"""

import datetime as dt
import importlib
import os
import shutil
import socket
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from governance.packages import (
    PackageHashMismatch,
    PackageNotApproved,
    approve_package,
    check_package,
    has_errors,
    load_manifest,
    package_hash,
)
from governance.synthetic import synthesize, write_library
from parties.secure_room.api import LibraryNotDeclared
from parties.secure_room.cli import package_app as app
from parties.secure_room.room import run_package
from parties.secure_room.sandbox import SandboxLimits, sandbox_available, sandbox_command
from scenarios.claim_check.generator import generate

CLAIM_PACKAGE = Path(__file__).resolve().parents[1] / "scenarios/claim_check/claim_package"
FAST = SandboxLimits(cpu_seconds=10, memory_bytes=1024**3, wall_seconds=30)

MANIFEST = """\
name = "probe"
version = "0.1.0"
entry_point = "main:run"

[[inputs]]
name = "visits"
dataset = "visits"
libraries = ["sample", "test"]
columns = ["hospital_id", "total_fen"]

[output]
disclosure = "model"

[[output.columns]]
name = "hospital_id"
type = "string"
"""


def make_package(root: Path, code: str, manifest: str = MANIFEST) -> Path:
    root.mkdir(parents=True)
    (root / "manifest.toml").write_text(manifest)
    (root / "main.py").write_text(textwrap.dedent(code))
    return root


def visits_table(hospitals: dict[str, int]) -> pd.DataFrame:
    rows = []
    for hospital, count in hospitals.items():
        for i in range(count):
            rows.append({"visit_id": f"{hospital}:V{i:08d}", "hospital_id": hospital,
                         "national_id": f"32050519900101{i:03d}X", "total_fen": 1000 + i,
                         "admission_date": dt.date(2025, 1, 1) + dt.timedelta(days=i)})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def sample_library(tmp_path_factory) -> Path:
    sandbox_available()  # fail loudly, not skip, when bubblewrap cannot run here
    target = tmp_path_factory.mktemp("libs") / "sample"
    write_library(target, "sample", {"visits": visits_table(
        {"hospital-1": 40, "hospital-2": 25, "hospital-3": 4})})
    return target


def harness_pids() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if b"/harness/harness.py" in handle.read():
                        pids.add(int(entry))
            except OSError:
                continue
    return pids


# --- hostile packages ---------------------------------------------------------------------


def test_socket_is_stopped(tmp_path, sample_library):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = f"""\
    import socket


    def run(tables):
        conn = socket.create_connection(("127.0.0.1", {port}), timeout=3)
        conn.sendall(b"national ids here")
        return tables["visits"][["hospital_id"]]
    """
    pkg = make_package(tmp_path / "p", code)
    assert "forbidden_import" in {f.code for f in check_package(pkg)}
    gated = run_package(pkg, sample_library, limits=FAST)
    assert (gated.report.outcome, gated.report.ran) == ("static_checks_failed", False)

    run = run_package(pkg, sample_library, limits=FAST, static_checks=False)
    assert run.report.ran and not run.report.accepted
    assert run.report.outcome == "error"
    assert "PermissionError" in run.report.detail
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing ever reached the host's loopback
    listener.close()


def test_reading_etc_passwd_is_stopped(tmp_path, sample_library):
    code = """\
    def run(tables):
        with open("/etc/passwd") as handle:
            handle.read()
        return tables["visits"][["hospital_id"]]
    """
    run = run_package(make_package(tmp_path / "p", code), sample_library, limits=FAST,
                      static_checks=False)
    assert run.report.outcome == "error"
    assert "FileNotFoundError" in run.report.detail and "/etc/passwd" in run.report.detail


def test_a_construct_the_checker_cannot_see_is_still_stopped(tmp_path, sample_library):
    code = """\
    import numpy as np
    import pandas as pd


    def run(tables):
        lines = np.fromregex("/etc/passwd", r"(.*)\\n", [("line", "U200")])
        return pd.DataFrame({"hospital_id": [str(x) for x in lines.tolist()]})
    """
    pkg = make_package(tmp_path / "p", code)
    assert not has_errors(check_package(pkg))  # the static checker misses it
    module_dir = str(pkg)
    sys.path.insert(0, module_dir)
    try:  # control: run on the host, the same code really does read the file
        leaked = importlib.import_module("main").run({})
        assert any("root" in line for line in leaked["hospital_id"])
    finally:
        sys.path.remove(module_dir)
        sys.modules.pop("main", None)
    run = run_package(pkg, sample_library, limits=FAST)
    assert run.report.outcome == "error" and "FileNotFoundError" in run.report.detail
    assert run.output is None


def test_library_files_outside_the_projection_are_invisible(tmp_path, sample_library):
    code = f"""\
    def run(tables):
        with open("{sample_library}/visits.parquet", "rb") as handle:
            handle.read()
        return tables["visits"][["hospital_id"]]
    """
    run = run_package(make_package(tmp_path / "p", code), sample_library, limits=FAST,
                      static_checks=False)
    assert "FileNotFoundError" in run.report.detail


def test_only_declared_columns_reach_the_package(tmp_path, sample_library):
    code = """\
    import pandas as pd


    def run(tables):
        return pd.DataFrame({"hospital_id": [",".join(sorted(tables["visits"].columns))]})
    """
    run = run_package(make_package(tmp_path / "p", code), sample_library, limits=FAST)
    assert run.report.outcome == "ok", run.report
    assert run.output == [{"hospital_id": "hospital_id,total_fen"}]


@pytest.mark.parametrize(
    "code",
    [
        """\
        import subprocess
        import sys


        def run(tables):
            subprocess.run([sys.executable, "-c", "print(1)"], check=True)
            return tables["visits"][["hospital_id"]]
        """,
        """\
        import os


        def run(tables):
            if os.fork() == 0:
                os._exit(0)
            return tables["visits"][["hospital_id"]]
        """,
    ],
    ids=["subprocess", "fork"],
)
def test_starting_a_process_is_stopped(tmp_path, sample_library, code):
    run = run_package(make_package(tmp_path / "p", code), sample_library, limits=FAST,
                      static_checks=False)
    assert run.report.outcome == "error"
    assert "PermissionError" in run.report.detail
    assert "Operation not permitted" in run.report.detail


@pytest.mark.parametrize(
    "code",
    [
        "def run(tables):\n    hoard = bytearray(1024 ** 3)\n",
        "import numpy as np\n\ndef run(tables):\n    hoard = np.ones(2 ** 27)\n",
        "def run(tables):\n    hoard = []\n    while True:\n        hoard.append('x' * 10**6)\n",
    ],
    ids=["bytearray", "numpy", "growing"],
)
def test_exceeding_memory_is_stopped(tmp_path, sample_library, code):
    limits = SandboxLimits(cpu_seconds=10, memory_bytes=768 * 1024**2, wall_seconds=30)
    run = run_package(make_package(tmp_path / "p", code), sample_library, limits=limits,
                      static_checks=False)
    assert run.report.outcome == "memory_limit"
    assert "MemoryError" in run.report.detail
    assert 0 < run.report.peak_memory_bytes < 768 * 1024**2


def test_exceeding_cpu_time_is_stopped(tmp_path, sample_library):
    code = """\
    def run(tables):
        while True:
            pass
    """
    limits = SandboxLimits(cpu_seconds=1, memory_bytes=1024**3, wall_seconds=30)
    run = run_package(make_package(tmp_path / "p", code), sample_library, limits=limits)
    assert run.report.outcome == "cpu_time_limit"
    assert run.report.signal in (24, 9)
    # Ended by the CPU limit, not the wall clock: the measured CPU time reached it.
    assert run.report.cpu_seconds >= limits.cpu_seconds


def test_exceeding_wall_time_kills_the_whole_sandbox(tmp_path, sample_library):
    code = """\
    import time


    def run(tables):
        time.sleep(120)
    """
    before = harness_pids()
    limits = SandboxLimits(cpu_seconds=10, memory_bytes=1024**3, wall_seconds=2)
    pkg = make_package(tmp_path / "p", code)
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(run_package, pkg, sample_library, limits=limits,
                             static_checks=False)
        seen: set[int] = set()
        while not future.done() and not seen:
            seen = harness_pids() - before
            time.sleep(0.05)
        run = future.result()
    assert seen, "the sandboxed harness process was never observed"
    assert run.report.outcome == "wall_time_limit"
    assert 2 <= run.report.wall_seconds < 10
    assert not (harness_pids() & seen)  # nothing left running


def test_inside_the_sandbox(tmp_path, sample_library):
    code = """\
    import os
    import pandas as pd


    def run(tables):
        with open("/proc/self/status") as handle:
            status = dict(line.split(":", 1) for line in handle.read().splitlines())
        with open("/proc/net/dev") as handle:
            interfaces = [line.split(":")[0].strip() for line in handle.readlines()[2:]]
        facts = {
            "uid": status["Uid"].split()[0],
            "caps": status["CapEff"].strip(),
            "interfaces": ",".join(sorted(interfaces)),
            "root": ",".join(sorted(os.listdir("/"))),
            "pids": ",".join(p for p in os.listdir("/proc") if p.isdigit()),
            "hostname": os.uname().nodename,
            "writable_pkg": str(os.access("/pkg", os.W_OK)),
        }
        return pd.DataFrame({"hospital_id": [f"{k}={v}" for k, v in facts.items()]})
    """
    run = run_package(make_package(tmp_path / "p", code), sample_library, limits=FAST,
                      static_checks=False)
    assert run.report.outcome == "ok", run.report
    facts = dict(r["hospital_id"].split("=", 1) for r in run.output)
    assert facts["uid"] == "65534"
    assert int(facts["caps"], 16) == 0
    assert facts["interfaces"] == "lo"  # a new, empty network namespace
    assert "etc" not in facts["root"].split(",") and "home" not in facts["root"].split(",")
    assert facts["pids"] == "1"  # its own pid namespace, the harness as its pid 1
    assert facts["hostname"] == "secure-room"
    assert facts["writable_pkg"] == "False"


# --- output policy in the room -------------------------------------------------------------


def test_aggregate_groups_under_k_are_suppressed(tmp_path, sample_library):
    pkg = tmp_path / "agg"
    result = CliRunner().invoke(app, ["init", str(pkg), "--name", "hospital-totals"])
    assert result.exit_code == 0, result.output
    run = run_package(pkg, sample_library, limits=FAST)
    assert run.report.outcome == "ok" and run.report.accepted
    assert run.report.suppressed_groups == 1 and run.report.k == 10
    assert sorted(r["hospital_id"] for r in run.output) == ["hospital-1", "hospital-2"]
    assert {r["hospital_id"]: r["n"] for r in run.output} == {"hospital-1": 40, "hospital-2": 25}


def test_an_output_with_an_undeclared_column_is_refused(tmp_path, sample_library):
    code = """\
    def run(tables):
        visits = tables["visits"]
        return visits[["hospital_id", "total_fen"]]
    """
    run = run_package(make_package(tmp_path / "p", code), sample_library, limits=FAST)
    assert run.report.outcome == "output_refused" and not run.report.accepted
    assert run.report.policy_decision == "OutputSchemaMismatch"
    assert run.report.schema_ok is False
    assert run.output is None


def test_identifiers_in_the_output_are_refused(tmp_path, sample_library):
    manifest = MANIFEST.replace('columns = ["hospital_id", "total_fen"]',
                                'columns = ["hospital_id", "national_id"]')
    code = """\
    import pandas as pd


    def run(tables):
        return pd.DataFrame({"hospital_id": tables["visits"]["national_id"]})
    """
    run = run_package(make_package(tmp_path / "p", code, manifest), sample_library,
                      limits=FAST)
    assert run.report.outcome == "output_refused"
    assert run.report.policy_decision == "IdentifierInOutput"


def test_library_tier_must_be_declared(tmp_path, sample_library):
    pkg = make_package(tmp_path / "p", "def run(t):\n    return t['visits']\n",
                       MANIFEST.replace('["sample", "test"]', '["test"]'))
    with pytest.raises(LibraryNotDeclared):
        run_package(pkg, sample_library, limits=FAST)


# --- the claim-check package ----------------------------------------------------------------


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenario") / "data"
    generate(out, patients=1500, claims=90, seed=21, progress=False)
    return out


def claim_tables(scenario: Path) -> dict[str, pd.DataFrame]:
    claims = pd.read_csv(scenario / "claims.csv", dtype=str)
    claims["claimed_fen"] = claims["claimed_fen"].astype("int64")
    claims["visit_date"] = pd.to_datetime(claims["visit_date"]).dt.date
    policies = pd.read_csv(scenario / "policies.csv", dtype=str, keep_default_na=False)
    policies["covered_categories"] = policies["covered_categories"].map(
        lambda text: [c for c in text.split(";") if c])
    policies["deductible_fen"] = policies["deductible_fen"].astype("int64")
    visits = pd.read_parquet(scenario / "ground_truth" / "visits.parquet")
    return {"visits": visits, "claims": claims, "policies": policies}


def test_claim_package_matches_the_ground_truth_on_the_authorized_library(tmp_path, scenario):
    library = tmp_path / "authorized"
    write_library(library, "authorized", claim_tables(scenario))
    owner = Ed25519PrivateKey.generate()
    with pytest.raises(PackageNotApproved):
        run_package(CLAIM_PACKAGE, library)
    with pytest.raises(PackageNotApproved):
        run_package(CLAIM_PACKAGE, library, owner_public_key=owner.public_key())
    approval = approve_package(CLAIM_PACKAGE, owner, "health-authority")
    run = run_package(CLAIM_PACKAGE, library, approval=approval,
                      owner_public_key=owner.public_key())
    assert run.report.outcome == "ok" and run.report.accepted, run.report
    assert run.report.package_sha256 == package_hash(CLAIM_PACKAGE)
    got = pd.DataFrame(run.output)
    truth = pd.read_csv(scenario / "ground_truth" / "claims_truth.csv", dtype={"claim_id": str})
    merged = got.merge(truth, on="claim_id", suffixes=("", "_truth"))
    assert len(merged) == len(truth) == 90
    for column in ("visit_found", "amount_consistent", "diagnosis_covered"):
        assert (merged[column] == merged[f"{column}_truth"]).all(), column
    expected = merged["payable_truth"].map(lambda v: Decimal(str(v)).quantize(Decimal("0.01")))
    assert (merged["payable"].map(Decimal) == expected).all()
    assert set(truth["kind"]) == {"true", "inflated", "fabricated", "uncovered",
                                  "date_off_by_one", "date_off_by_several"}

    changed = tmp_path / "changed"
    shutil.copytree(CLAIM_PACKAGE, changed, ignore=shutil.ignore_patterns("__pycache__"))
    with open(changed / "verdict.py", "ab") as handle:
        handle.write(b" ")
    with pytest.raises(PackageHashMismatch):
        run_package(changed, library, approval=approval, owner_public_key=owner.public_key())


def test_claim_package_runs_on_the_synthetic_sample_library(tmp_path, scenario):
    tables = claim_tables(scenario)
    visits = synthesize(tables["visits"], 300, seed=4).table
    picked = visits.sample(n=20, random_state=1)
    found = pd.DataFrame({
        "claim_id": [f"S{i:03d}" for i in range(20)], "insurer": "insurer-a",
        "national_id": picked["national_id"].to_numpy(),
        "hospital_id": picked["hospital_id"].to_numpy(),
        "visit_date": picked["admission_date"].to_numpy(),
        "claimed_fen": picked["self_pay_fen"].to_numpy(),
        "diagnosis_code": picked["diagnosis_code"].to_numpy()})
    missing = found.assign(claim_id=[f"M{i:03d}" for i in range(20)],
                           visit_date=[d + dt.timedelta(days=5) for d in found["visit_date"]])
    policies = pd.DataFrame({
        "insurer": "insurer-a", "national_id": picked["national_id"].to_numpy(),
        "covered_categories": [[code.split(".")[0]] for code in picked["diagnosis_code"]],
        "deductible_fen": np.zeros(20, dtype="int64")})
    library = tmp_path / "sample"
    write_library(library, "sample", {"visits": visits, "claims": pd.concat([found, missing]),
                                      "policies": policies})
    run = run_package(CLAIM_PACKAGE, library, limits=FAST)
    assert run.report.outcome == "ok" and run.report.accepted, run.report
    by_id = {r["claim_id"]: r for r in run.output}
    for claim, self_pay in zip(found["claim_id"], found["claimed_fen"], strict=True):
        record = by_id[claim]
        assert record["visit_found"] and record["amount_consistent"]
        assert record["diagnosis_covered"]
        assert Decimal(record["payable"]) == Decimal(int(self_pay)) / 100
    assert not any(by_id[c]["visit_found"] for c in missing["claim_id"])


# --- report, command line, CLI ---------------------------------------------------------------


def test_report_carries_the_run_facts(tmp_path, sample_library):
    pkg = tmp_path / "agg"
    CliRunner().invoke(app, ["init", str(pkg), "--name", "facts"])
    run = run_package(pkg, sample_library, limits=FAST)
    report = run.report
    assert report.exit_code == 0 and report.signal is None
    assert report.wall_seconds > 0 and report.cpu_seconds > 0
    assert report.peak_memory_bytes > 10 * 1024**2
    assert report.package_sha256 == package_hash(pkg)
    assert report.limits["memory_bytes"] == FAST.memory_bytes
    command = report.sandbox_command
    for flag in ("--unshare-all", "--die-with-parent", "--new-session", "--clearenv"):
        assert flag in command
    assert command[command.index("--cap-drop") + 1] == "ALL"
    assert "--ro-bind" in command and "/etc" not in command


def test_sandbox_command_binds_nothing_writable_but_out(tmp_path):
    command = sandbox_command(read_only={"/pkg": tmp_path / "p", "/data": tmp_path / "d"},
                              out_dir=tmp_path / "o", limits=FAST, harness_args=[], seccomp_fd=3,
                              isolation="rlimits_only")
    writable = [command[i + 2] for i, arg in enumerate(command) if arg == "--bind"]
    assert writable == ["/out"]
    assert f"--as={FAST.memory_bytes}" in command


def test_cli_init_test_submit(tmp_path, sample_library, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["--help"]).exit_code == 0
    for command in ("init", "test", "submit", "approve", "verify"):
        assert runner.invoke(app, [command, "--help"]).exit_code == 0
    pkg = tmp_path / "pkg"
    assert runner.invoke(app, ["init", str(pkg), "--name", "cli-demo"]).exit_code == 0
    tested = runner.invoke(app, ["test", str(pkg), "--library", str(sample_library)])
    assert tested.exit_code == 0, tested.output
    assert "hospital-1" in tested.output
    submitted = runner.invoke(app, ["submit", str(pkg), "--library", str(sample_library),
                                    "--report", str(tmp_path / "report.json")])
    assert submitted.exit_code == 0, submitted.output
    assert (pkg / "package.sha256").read_text().strip() == package_hash(pkg)
    assert '"accepted": true' in (tmp_path / "report.json").read_text()
    assert load_manifest(pkg).name == "cli-demo"
    (pkg / "cli_demo.py").write_text("import os\n" + (pkg / "cli_demo.py").read_text())
    refused = runner.invoke(app, ["submit", str(pkg), "--library", str(sample_library)])
    assert refused.exit_code == 1
    assert "forbidden_import" in refused.output
