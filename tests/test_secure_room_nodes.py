"""In-air development on real nodes: libraries, the secure room, approval, production, catalogue.

One federation (hospital-1, health-authority, operator, regulator) as real processes over
mutual TLS. The hospital exports, the authority governs, then builds and publishes the
sample and test libraries; the regulator develops, submits to the operator's secure
room; the authority approves and runs on its authorized data; the catalogue fills.
"""

import json
import shutil
import sqlite3
import textwrap
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from governance.contracts import SignedContract, load_contract, sign_contract
from governance.ledger import decode_leaf
from governance.packages import package_hash
from parties.agreements.api import REGISTER_CONTRACT
from parties.ingest.api import HOSPITAL_EXPORT, ExportRequest
from parties.ingest.governed import governed_visits
from parties.node import open_node
from parties.runtime.client import NodeClient
from parties.runtime.errors import RemoteError
from parties.runtime.pki import load_signing_key
from parties.runtime.routes import Kind
from parties.secure_room.api import (
    CATALOGUE,
    LIBRARIES,
    PRODUCT,
    PRODUCTION_RUN,
    REVIEWS,
    RUN_PACKAGE,
    SUBMISSION,
    SUBMIT_PACKAGE,
    CatalogueEntry,
    PackageUpload,
    RunRequest,
    Submission,
)
from parties.secure_room.cli import fetch_sample
from parties.secure_room.libraries import authorized_visits
from parties.secure_room.sandbox import sandbox_available
from parties.secure_room.wire import package_to_wire
from scenarios.claim_check.generator import generate
from tests.federation import Federation

NODES = ["hospital-1", "health-authority", "operator", "regulator"]
CLAIM_PACKAGE = Path(__file__).resolve().parents[1] / "scenarios/claim_check/claim_package"
COMPARED = ("hospital_id", "birth_date", "sex", "admission_date", "discharge_date",
            "diagnosis_code", "total_fen", "covered_fen", "self_pay_fen")

PROBE_MANIFEST = """\
name = "{name}"
version = "0.1.0"
entry_point = "main:run"

[[inputs]]
name = "visits"
dataset = "visits"
libraries = ["sample", "test", "authorized"]
columns = ["hospital_id", "diagnosis_code", "self_pay_fen"]

[output]
disclosure = "model"

[[output.columns]]
name = "hospital_id"
type = "string"
"""

AGGREGATE_MANIFEST = """\
name = "self-pay-by-diagnosis"
version = "0.1.0"
entry_point = "main:run"

[[inputs]]
name = "visits"
dataset = "visits"
libraries = ["sample", "test", "authorized"]
columns = ["diagnosis_code", "self_pay_fen"]

[output]
disclosure = "aggregate"
count_column = "n"

[[output.columns]]
name = "diagnosis_code"
type = "string"

[[output.columns]]
name = "n"
type = "int64"

[[output.columns]]
name = "self_pay_fen"
type = "int64"
"""

AGGREGATE_CODE = """\
def run(tables):
    visits = tables["visits"]
    grouped = visits.groupby("diagnosis_code", as_index=False).agg(
        n=("self_pay_fen", "size"), self_pay_fen=("self_pay_fen", "sum"))
    return grouped[["diagnosis_code", "n", "self_pay_fen"]]
"""


PACKAGE_CONTRACT = (Path(__file__).resolve().parents[1]
                    / "scenarios/claim_check/contracts/package-run-claim-check.toml")
ROOM_CONTRACT = "room-runs-2026"  # every production run of this module's packages


class Room:
    def __init__(self, fed: Federation, data: Path, work: Path) -> None:
        self.fed, self.data, self.work = fed, data, work

    def contract(self, contract_id: str, outputs: list[str], runs_per_day: int = 20,
                 signers: int | None = None) -> None:
        """Register a package-run contract between this federation's nodes (its one
        hospital among them), signed by all (or by the first `signers`) of its parties."""
        base = load_contract(PACKAGE_CONTRACT)
        parties = ("regulator", "operator", "health-authority", "hospital-1")
        terms = base.model_copy(update={
            "contract_id": contract_id, "parties": parties, "allowed_outputs": tuple(outputs),
            "quota": base.quota.model_copy(update={"queries_per_day": runs_per_day}),
            "revenue_split_bp": {"health-authority": 4000, "operator": 3000,
                                 "hospital-1": 3000, "regulator": 0}})
        signed = SignedContract(terms=terms)
        for party in parties[:signers]:
            signed = sign_contract(signed, party, load_signing_key(self.fed.state, party))
        with self.client("regulator") as client:
            client.call("regulator", REGISTER_CONTRACT, signed)

    def client(self, node: str) -> NodeClient:
        return NodeClient(self.fed.state, self.fed.topology, node, timeout=600)

    def cli(self, *args: str, code: int = 0) -> str:
        from scenarios.cli import app

        result = CliRunner().invoke(app, [*args, "--state", str(self.fed.state.root),
                                          "--topology", str(self.fed.topology_path)])
        assert result.exit_code == code, result.output
        return " ".join(result.output.split())  # rich wraps lines at the terminal width

    def submit(self, package: Path) -> Submission:
        with self.client("regulator") as client:
            return client.call("operator", SUBMIT_PACKAGE,
                               PackageUpload(files=package_to_wire(package)))

    def run(self, sha: str, contract_id: str = ROOM_CONTRACT) -> CatalogueEntry:
        with self.client("regulator") as client:
            return client.call("operator", RUN_PACKAGE, RunRequest(contract_id=contract_id),
                               params={"sha256": sha})

    def events(self, kind: str) -> list:
        with sqlite3.connect(f"file:{self.fed.state.node('operator').db}?mode=ro",
                             uri=True) as db:
            leaves = [bytes(r[0]) for r in db.execute(
                "SELECT leaf FROM ledger_entries ORDER BY leaf_index")]
        events = [decode_leaf(leaf).entry.event for leaf in leaves]
        return [e for e in events if e.kind == kind]

    def authority(self):
        return open_node(self.fed.state, self.fed.topology, "health-authority")


def make_package(root: Path, manifest: str, code: str) -> Path:
    root.mkdir(parents=True)
    (root / "manifest.toml").write_text(manifest)
    (root / "main.py").write_text(textwrap.dedent(code))
    return root


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    sandbox_available()  # fail loudly, not skip, when bubblewrap cannot run here
    root = tmp_path_factory.mktemp("room")
    generate(root / "data", hospitals=1, patients=300, claims=30, seed=5, progress=False)
    fed = Federation(root, nodes=NODES)
    fed.up()
    try:
        r = Room(fed, root / "data", root / "work")
        raw = next((root / "data" / "raw").iterdir())
        with r.client("hospital-1") as client:
            client.call("hospital-1", HOSPITAL_EXPORT, ExportRequest(path=str(raw), batch_rows=200))
        r.built = r.cli("package", "libraries", "--sample-rows", "400", "--test-rows", "60")
        r.contract(ROOM_CONTRACT, ["package.claim-check", "package.self-pay-by-diagnosis"])
        yield r
    finally:
        fed.down()


@pytest.fixture(scope="module")
def approved_claim_check(room):
    """The claim-check package submitted by the regulator and approved by the authority."""
    package = room.work / "claim-check"
    shutil.copytree(CLAIM_PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    out = room.cli("package", "submit", str(package))
    sha = package_hash(package)
    assert sha in out and "sent to the data owner for review" in out
    with room.client("regulator") as client, pytest.raises(RemoteError) as refused:
        client.call("operator", RUN_PACKAGE, RunRequest(contract_id=ROOM_CONTRACT),
                    params={"sha256": sha})
    assert (refused.value.http_status, refused.value.error) == (403, "PackageNotApproved")
    assert [e.payload["error"] for e in room.events("package_run_refused")
            if e.payload["package_sha256"] == sha] == ["PackageNotApproved"]
    assert sha[:16] in room.cli("package", "reviews")
    assert "approved claim-check 1.0.0" in room.cli("package", "approve", sha)
    return package, sha


def test_libraries_are_published_to_the_development_environment(room):
    assert "sample fidelity" in room.built and "0 exact copies" in room.built
    with room.client("regulator") as client:
        published = client.call("operator", LIBRARIES)
        # The test library serves the secure room only: developers get the sample.
        with pytest.raises(RemoteError) as refused:
            client.request("operator", "GET", f"{LIBRARIES.path}/claim_check/test",
                           kind=Kind.CATALOGUE)
        assert refused.value.http_status == 404
    by_kind = {lib.kind: lib for lib in published}
    assert set(by_kind) == {"sample", "test"}
    assert by_kind["sample"].tables["visits"] == 400
    assert by_kind["test"].tables["visits"] == 60
    report = by_kind["sample"].reports["visits"]
    assert report["exact_matches"] == 0 and report["rows_below_threshold"] == 0
    assert set(report["fidelity"]) >= {"diagnosis_code", "self_pay_fen", "admission_date"}
    registered = [e for e in room.events("data_registered")
                  if e.payload.get("stage") == "library"]
    assert {(e.actor, e.payload["library"], e.payload["library_sha256"]) for e in registered} \
        >= {("health-authority", k, lib.sha256) for k, lib in by_kind.items()}


def test_the_published_sample_holds_no_real_row(room):
    sample_dir = fetch_sample(room.fed.state.root, room.fed.topology, "regulator", "claim_check")
    sample = pd.read_parquet(sample_dir / "visits.parquet")
    ha = room.authority()
    try:
        real = authorized_visits(ha, b"\x00" * 32)
        ids = governed_visits(ha, ("national_id",))
    finally:
        ha.store.close()
    assert len(sample) == 400 and len(real) > 400

    def rows(frame: pd.DataFrame) -> set:
        return set(frame[list(COMPARED)].astype(str).itertuples(index=False, name=None))

    assert not rows(sample) & rows(real)
    assert not set(sample["national_id"]) & (set(ids["national_id"]) | set(real["national_id"]))
    assert not set(sample["visit_id"]) & (set(ids["visit_id"]) | set(real["visit_id"]))


def test_package_test_runs_on_the_sample_library_fetched_from_the_operator(room):
    package = room.work / "local-claim-check"
    shutil.copytree(CLAIM_PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    out = room.cli("package", "test", str(package), "--rows", "3")
    assert "on the sample library" in out and ": ok" in out


def test_claim_check_submitted_validated_approved_run_and_catalogued(room, approved_claim_check):
    _, sha = approved_claim_check
    with room.client("regulator") as client:
        submission = client.call("operator", SUBMISSION, params={"sha256": sha})
    report = submission.report
    assert submission.accepted and report["library"] == "test" and report["ran"]
    assert report["schema_ok"] and report["disclosure_ok"] and report["output_rows"] > 0
    assert report["wall_seconds"] > 0 and report["peak_memory_bytes"] > 0
    submitted = [e for e in room.events("package_submitted")
                 if e.payload["package_sha256"] == sha]
    assert submitted[0].payload["report_sha256"] == submission.report_sha256
    approved = [e for e in room.events("package_approved") if e.payload["package_sha256"] == sha]
    assert approved and approved[0].actor == "health-authority"

    # The package also reads `policies`, which the owner does not hold: refused up front,
    # as malformed input (422, exit 2).
    out = room.cli("package", "run", sha, "--contract", ROOM_CONTRACT,
                   "--query", f"claims={room.data / 'claims.csv'}", code=2)
    assert "QueryTablesInvalid" in out and "policies" in out
    out = room.cli("package", "run", sha, "--contract", ROOM_CONTRACT,
                   "--query", f"claims={room.data / 'claims.csv'}",
                   "--query", f"policies={room.data / 'policies.csv'}", "--rows", "0")
    assert "catalogued as product" in out
    product = out.split("catalogued as product ")[1].split(":")[0]
    assert product in room.cli("catalogue", "list")
    assert product in room.cli("catalogue", "show", product, "--rows", "2")
    with room.client("regulator") as client:
        entry = client.call("operator", PRODUCT, params={"product_id": product})
    assert entry.report["library"] == "authorized" and entry.report["accepted"]

    # The verdicts on the authorized (pseudonymized) data equal the generator's ground truth.
    got = pd.DataFrame(entry.output)
    truth = pd.read_csv(room.data / "ground_truth" / "claims_truth.csv", dtype={"claim_id": str})
    merged = got.merge(truth, on="claim_id", suffixes=("", "_truth"))
    assert len(merged) == len(truth) == 30
    for column in ("visit_found", "amount_consistent", "diagnosis_covered"):
        assert (merged[column] == merged[f"{column}_truth"]).all(), column
    expected = merged["payable_truth"].map(lambda v: Decimal(str(v)).quantize(Decimal("0.01")))
    assert (merged["payable"].map(Decimal) == expected).all()

    runs = [e for e in room.events("package_run") if e.payload["run_id"] == product]
    assert len(runs) == 1 and runs[0].actor == "health-authority"
    meter = runs[0].payload
    assert meter["output_sha256"] == entry.output_sha256 and meter["rows_returned"] == 30
    assert meter["records_touched"] > 400 and meter["party"] == "regulator"
    assert meter["contract_id"] == ROOM_CONTRACT and meter["compute_ms"] > 0
    # rev19: the public meter has power-of-two classes of what the package sets at will
    # (CPU, wall, peak memory), never the suppressed-group count.
    for figure in ("compute_ms", "wall_ms", "peak_memory_kib"):
        assert meter[figure] > 0 and meter[figure] & (meter[figure] - 1) == 0, figure
    assert "suppressed_groups" not in meter
    published = [e for e in room.events("product_published")
                 if e.payload["product_id"] == product]
    assert published and published[0].actor == "operator"


def test_an_approved_package_changed_by_one_byte_is_refused(room, approved_claim_check):
    package, sha = approved_claim_check
    changed = room.work / "claim-check-changed"
    shutil.copytree(package, changed)
    with open(changed / "verdict.py", "ab") as handle:
        handle.write(b" ")
    submission = room.submit(changed)
    changed_sha = submission.package_sha256
    assert changed_sha != sha and submission.accepted  # still fine on the test library
    with room.client("regulator") as client:
        before = len(client.call("operator", CATALOGUE))
    with pytest.raises(RemoteError) as refused:
        room.run(changed_sha)
    assert (refused.value.http_status, refused.value.error) == (409, "PackageHashMismatch")
    refusals = [e for e in room.events("package_run_refused")
                if e.payload["package_sha256"] == changed_sha]
    assert refusals and refusals[0].payload["error"] == "PackageHashMismatch"
    assert refusals[0].actor == "health-authority"
    with room.client("regulator") as client:
        assert len(client.call("operator", CATALOGUE)) == before
    with sqlite3.connect(room.fed.state.node("health-authority").db) as db:
        logged = db.execute("SELECT error FROM refusals WHERE route = ?",
                            (PRODUCTION_RUN.path,)).fetchall()
    assert ("PackageHashMismatch",) in logged


def test_hostile_packages_are_stopped_and_reported_by_the_secure_room(room):
    opens_socket = make_package(room.work / "socket", PROBE_MANIFEST.format(name="exfil"), """\
        import socket


        def run(tables):
            socket.create_connection(("127.0.0.1", 9), timeout=3).sendall(b"rows")
            return tables["visits"][["hospital_id"]]
        """)
    # np.fromregex reads a file by name: the static checker cannot see it, the sandbox can.
    reads_passwd = make_package(room.work / "passwd", PROBE_MANIFEST.format(name="peek"), """\
        import numpy as np
        import pandas as pd


        def run(tables):
            lines = np.fromregex("/etc/passwd", r"(.*)\\n", [("line", "U200")])
            return pd.DataFrame({"hospital_id": [str(x) for x in lines.tolist()]})
        """)
    gated = room.submit(opens_socket)
    assert (gated.outcome, gated.report["ran"], gated.accepted) == (
        "static_checks_failed", False, False)
    assert "forbidden_import" in {f["code"] for f in gated.report["static_findings"]}
    stopped = room.submit(reads_passwd)
    assert stopped.report["ran"] and not stopped.accepted
    assert stopped.outcome == "error" and "FileNotFoundError" in stopped.report["detail"]
    for sub in (gated, stopped):
        assert not sub.forwarded_for_review
        logged = [e for e in room.events("package_submitted")
                  if e.payload["package_sha256"] == sub.package_sha256]
        assert logged[0].payload["accepted"] is False
        with pytest.raises(RemoteError) as refused:
            room.run(sub.package_sha256)
        assert refused.value.error == "PackageNotValidated"
    with room.client("health-authority") as client:
        queued = {r.package_sha256 for r in client.call("health-authority", REVIEWS)}
    assert not {gated.package_sha256, stopped.package_sha256} & queued


def test_aggregate_groups_under_k_are_suppressed_in_production(room):
    package = make_package(room.work / "aggregate", AGGREGATE_MANIFEST, AGGREGATE_CODE)
    submission = room.submit(package)
    assert submission.accepted, submission.report
    sha = submission.package_sha256
    room.cli("package", "approve", sha)
    entry = room.run(sha)
    ha = room.authority()
    try:
        real = authorized_visits(ha, b"\x01" * 32)
    finally:
        ha.store.close()
    groups = real.groupby("diagnosis_code").agg(n=("self_pay_fen", "size"),
                                                self_pay_fen=("self_pay_fen", "sum"))
    small = groups[groups["n"] < 10]
    assert len(small) > 0 and len(groups) > len(small)
    # rev19: how many groups were suppressed is the package's to choose: the requester, the
    # catalogue and the public log never see it.
    assert entry.report["suppressed_groups"] is None
    assert "suppressed_groups" not in entry.model_dump()
    logged = [e.payload for e in room.events("package_run") + room.events("product_published")
              if e.payload.get("run_id", e.payload.get("product_id")) == entry.product_id]
    assert len(logged) == 2 and not any("suppressed_groups" in p for p in logged)
    released = {r["diagnosis_code"]: (r["n"], r["self_pay_fen"]) for r in entry.output}
    expected = groups[groups["n"] >= 10]
    assert released == {code: (int(row.n), int(row.self_pay_fen))
                        for code, row in expected.iterrows()}
    assert all(n >= 10 for n, _ in released.values())


def test_a_package_run_outside_its_contract_is_refused_logged_and_never_billed(room):
    """The developer runs an approved package on the authorized library under no contract,
    under a contract that does not name the package's output, under one the hospital has
    not signed, under one terminated at the serving node, and past a contract's daily
    quota of one run: each refused at the data
    owner before a row is opened, logged (`package_run_refused`), no meter, nothing billed.
    The one run in force is metered by the owner (CPU it measured) and billed, the hospital
    taking its share."""
    package = make_package(room.work / "aggregate-contracts", AGGREGATE_MANIFEST,
                           AGGREGATE_CODE)
    submission = room.submit(package)
    sha = submission.package_sha256
    room.cli("package", "approve", sha)
    room.contract("room-narrow-2026", ["package.claim-check"])
    room.contract("room-unsigned-2026", ["package.self-pay-by-diagnosis"], signers=3)
    room.contract("room-one-run-2026", ["package.self-pay-by-diagnosis"], runs_per_day=1)
    room.contract("room-ended-2026", ["package.self-pay-by-diagnosis"])
    room.cli("contract", "terminate", "room-ended-2026", "--as", "regulator")
    refused = {}
    for contract_id in ("no-such-2026", "room-narrow-2026", "room-unsigned-2026",
                        "room-ended-2026"):
        with pytest.raises(RemoteError) as error:
            room.run(sha, contract_id)
        refused[contract_id] = error.value.error
    entry = room.run(sha, "room-one-run-2026")
    with pytest.raises(RemoteError) as over_quota:
        room.run(sha, "room-one-run-2026")
    refused["past quota"] = over_quota.value.error
    assert refused == {"no-such-2026": "ContractUnknown", "room-narrow-2026": "OutputNotAllowed",
                       "room-unsigned-2026": "ContractNotSigned",
                       "room-ended-2026": "ContractTerminated", "past quota": "QuotaExceeded"}
    logged = [(e.payload["contract_id"], e.payload["error"])
              for e in room.events("package_run_refused") if e.payload["package_sha256"] == sha]
    assert logged == [("no-such-2026", "ContractUnknown"),
                      ("room-narrow-2026", "OutputNotAllowed"),
                      ("room-unsigned-2026", "ContractNotSigned"),
                      ("room-ended-2026", "ContractTerminated"),
                      ("room-one-run-2026", "QuotaExceeded")]
    meters = [e for e in room.events("package_run") if e.payload["package_sha256"] == sha
              and e.payload["contract_id"] != ROOM_CONTRACT]
    assert [(m.payload["contract_id"], m.payload["run_id"]) for m in meters] == [
        ("room-one-run-2026", entry.product_id)]
    assert meters[0].actor == "health-authority" and meters[0].payload["compute_ms"] > 0

    period = datetime.now(UTC).astimezone(timezone(timedelta(hours=8))).strftime("%Y-%m")
    bills = {}
    for contract_id in ("room-one-run-2026", "room-narrow-2026", "room-unsigned-2026"):
        bills[contract_id] = json.loads(room.cli("billing", "statement", "--contract",
                                                 contract_id, "--period", period, "--json"))
    one_run = bills["room-one-run-2026"]
    assert one_run["meters"]["queries"] == 1 and one_run["total_fen"] == 20_000
    assert not one_run["anomalies"]
    shares = {s["party"]: s["amount_fen"] for s in one_run["shares"]}
    assert shares["hospital-1"] == 5700 and shares["regulator"] == 0  # 30 % of 95 %
    assert one_run["risk_reserve_fen"] + sum(shares.values()) == 20_000
    for contract_id in ("room-narrow-2026", "room-unsigned-2026"):
        assert bills[contract_id]["meters"]["queries"] == 0
        assert bills[contract_id]["total_fen"] == 0
