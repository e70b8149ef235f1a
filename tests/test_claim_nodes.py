"""The fast-claim check through real node processes.

One module-scoped federation of all eight nodes: the generated data goes hospitals ->
health authority -> operator (`cogov govern ingest`), the insurers' contracts are
signed by every party and registered at the regulator, the claimants' consents are
issued with their keys and registered. Then `plain`, `he` and `ss` answer the same
500 claims through the nodes, and refusals, retries and crashes are exercised.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from governance.billing import statement
from governance.consent import Consent, consent_signing_key, revoke_consent
from governance.contracts import load_contract, parse_contract, sign_contract
from governance.ledger import decode_leaf
from governance.ledger.proofs import Receipt
from governance.meters import sign_request
from mpc.claim import ss_shares
from mpc.claim.constants import VERDICT_COLUMNS
from mpc.errors import MalformedInput
from parties.agreements.api import REGISTER_CONTRACT, REVOKE_CONSENT
from parties.claims.api import (
    ANSWER_PURPOSE,
    CHECK,
    COMPUTE,
    NOT_CHECKABLE,
    REQUEST_SIGNATURE_HEADER,
    ClaimCheckRequest,
    ClaimCheckResponse,
    HospitalNotInTopology,
    signed_request,
)
from parties.claims.cli import consumer_keys, issue_consents
from parties.claims.client import ClaimBatchFailed, Client
from parties.domains.api import LEVEL1_STEP, LIST_DOMAINS
from parties.ledger.api import LogForked, ReceiptInvalid
from parties.ledger.log_view import LogView
from parties.runtime import supervisor
from parties.runtime.cli import ExitCode
from parties.runtime.client import NodeClient
from parties.runtime.errors import FlowNotAllowed, RemoteError
from parties.runtime.node_log import REQUEST_ID_HEADER, read_log
from parties.runtime.pki import federation_signing_keys, load_signing_key
from parties.runtime.routes import Kind
from parties.runtime.sealing import open_sealed
from scenarios.claim_check.generator import generate
from tests.attack_helpers import raw_request
from tests.federation import Federation

ALL_NODES = ["hospital-1", "hospital-2", "hospital-3", "health-authority", "operator",
             "regulator", "insurer-a", "insurer-b"]
INSURERS = ("insurer-a", "insurer-b")
CONTRACTS = Path(__file__).resolve().parents[1] / "scenarios" / "claim_check" / "contracts"
SEED = 5
REPEAT = 40
# This module checks every claimant's claims many times over on one consent per claimant
# (three modes, the CLI, 40 copies in the crash tests; up to 18 claims at one hospital):
# its test contracts buy a large daily check budget. The scenario's contracts keep theirs.
ROOMY_BUDGET = 1_000_000


@dataclass
class ClaimFed:
    fed: Federation
    data: Path
    claims: pd.DataFrame
    policies: pd.DataFrame
    truth: pd.DataFrame
    keys: dict[str, str]
    consents: dict[str, dict[str, Consent]] = field(default_factory=dict)
    clients: dict[str, Client] = field(default_factory=dict)
    two_visits: dict = field(default_factory=dict)  # `_plant_second_visit`'s claims

    def part(self, insurer: str) -> pd.DataFrame:
        return self.claims[self.claims["insurer"] == insurer].reset_index(drop=True)

    def node_client(self, node: str) -> NodeClient:
        return NodeClient(self.fed.state, self.fed.topology, node, timeout=120)

    def client(self, insurer: str, contract: str) -> Client:
        client = Client(insurer, state=self.fed.state, topology=self.fed.topology,
                        contract_id=contract, policies=self.policies)
        base = self.clients[insurer]
        client._tokens.update(base._tokens)  # same insurer, same domain: reuse its tokens
        return client

    def ledger(self) -> list:
        conn = sqlite3.connect(f"file:{self.fed.state.node('operator').db}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT leaf FROM ledger_entries ORDER BY leaf_index").fetchall()
        finally:
            conn.close()
        return [decode_leaf(bytes(r[0])).entry.event for r in rows]

    def log_ids(self, request_id: str) -> set[str]:
        """The ids the nodes know a client's request id by (each insurer's log id of it)."""
        return {self.clients[insurer].log_id(request_id) for insurer in INSURERS}

    def events(self, kind: str, request_id: str) -> list:
        ids = self.log_ids(request_id)
        return [e for e in self.ledger() if e.kind == kind and e.request_id in ids]

    def log(self, node: str, event: str, request_id: str | None = None) -> list[dict]:
        ids = None if request_id is None else self.log_ids(request_id)
        return [e for e in read_log(self.fed.state.node(node).log) if e["event"] == event
                and (ids is None or e.get("request_id") in ids)]

    def usage_rows(self, request_id: str) -> int:
        conn = sqlite3.connect(f"file:{self.fed.state.node('regulator').db}?mode=ro", uri=True)
        try:
            ids = sorted(self.log_ids(request_id))
            marks = ", ".join("?" * len(ids))
            return conn.execute(
                f"SELECT COUNT(*) FROM contract_usage WHERE request_id IN ({marks})", ids
            ).fetchone()[0]
        finally:
            conn.close()


def _sign_and_register(cf: ClaimFed, terms: dict) -> str:
    contract = parse_contract(terms)
    signed = None
    for party in contract.parties:
        signed = sign_contract(signed or contract, party, load_signing_key(cf.fed.state, party))
    assert signed is not None
    with cf.node_client("regulator") as client:  # the product owner registers
        client.call("regulator", REGISTER_CONTRACT, signed)
    return contract.contract_id


def _terms(insurer: str, contract_id: str, **changes) -> dict:
    terms = load_contract(CONTRACTS / f"claim-check-{insurer}.toml").model_dump(mode="json")
    terms["contract_id"] = contract_id
    for key, value in changes.items():
        terms[key] = value
    return terms


def _wait(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()


def _plant_second_visit(data: Path) -> dict:
    """Add to hospital-1's raw export a second visit one day after a visit V of an insured
    claimant of insurer-a, so a claim dated on V has two visits in its window. V is one no
    generated claim's window reaches the new day from, so the ground truth is unchanged.
    Returns two claims on V's day, both claiming a little more than V's self-pay: one with
    V's diagnosis (amount passes only on the new visit, diagnosis only on V: not payable)
    and one with the new visit's diagnosis (both tests on the new visit: payable)."""
    raw = data / "raw" / "hospital-1.csv"
    rows = pd.read_csv(raw, dtype=str, keep_default_na=False)
    claims = pd.read_csv(data / "claims.csv", dtype={"national_id": str})
    policies = pd.read_csv(data / "policies.csv", dtype={"national_id": str})
    policy = policies[policies["insurer"] == "insurer-a"].set_index("national_id")
    claimants = set(claims.loc[claims["insurer"] == "insurer-a", "national_id"])
    codes = {code[:3]: code for code in rows["dx_code"]}  # a recorded code per category
    for row in rows.itertuples(index=False):
        if row.pid not in claimants or row.pid not in policy.index:
            continue
        covered = set(str(policy.at[row.pid, "covered_categories"]).split(";"))
        day = datetime.fromisoformat(row.admit_date).date()
        mine = claims[(claims["national_id"] == row.pid) & (claims["hospital_id"] == "hospital-1")]
        gaps = [(datetime.fromisoformat(d).date() - day).days for d in mine["visit_date"]]
        others = [c for c in codes if c in covered and c != row.dx_code[:3]]
        if row.dx_code[:3] not in covered or not others or any(-1 <= g <= 3 for g in gaps):
            continue
        self_pay = round(float(row.self_paid) * 100)
        new = row._asdict() | {
            "record_no": "V99999999", "dx_code": codes[others[0]],
            "admit_date": (day + timedelta(days=1)).isoformat(),
            "discharge_date": (day + timedelta(days=2)).isoformat(),
            "self_paid": f"{(self_pay + 500_000) / 100:.2f}",
            "total_amount": f"{(self_pay + 500_000) / 100 + float(row.insurance_paid):.2f}"}
        pd.concat([rows, pd.DataFrame([new])]).to_csv(raw, index=False)
        claimed = self_pay + 100
        base = {"insurer": "insurer-a", "national_id": row.pid, "hospital_id": "hospital-1",
                "visit_date": day.isoformat(), "claimed_fen": claimed}
        payable = max(0, claimed - int(policy.at[row.pid, "deductible_fen"]))
        return {
            "claims": pd.DataFrame([base | {"claim_id": "TWO-split", "diagnosis_code": row.dx_code},
                                    base | {"claim_id": "TWO-one",
                                            "diagnosis_code": codes[others[0]]}]),
            "payable": f"{payable // 100}.{payable % 100:02d}"}
    raise AssertionError("no visit to plant a second one next to")


@pytest.fixture(scope="module")
def cf(tmp_path_factory) -> Iterator[ClaimFed]:
    root = tmp_path_factory.mktemp("claims")
    generate(root / "data", patients=150, claims=500, seed=SEED, progress=False)
    two_visits = _plant_second_visit(root / "data")
    fed = Federation(root, nodes=ALL_NODES)
    fed.up()
    clients: dict[str, Client] = {}
    try:
        from scenarios.cli import app

        result = CliRunner().invoke(app, [
            "govern", "ingest", "--data", str(root / "data"), "--batch-rows", "500",
            "--state", str(fed.state.root), "--topology", str(fed.topology_path)])
        assert result.exit_code == 0, result.output
        data = root / "data"
        claims = pd.read_csv(data / "claims.csv", dtype={"national_id": str})
        cf = ClaimFed(
            fed=fed, data=data, claims=claims,
            policies=pd.read_csv(data / "policies.csv", dtype={"national_id": str}),
            truth=pd.read_csv(data / "ground_truth" / "claims_truth.csv"),
            keys=consumer_keys(data / "consumer_keys.jsonl"),
            two_visits=two_visits,
        )
        every_mode = ["visit_found", "amount_consistent", "diagnosis_covered", "payable",
                      "mode.ss", "mode.he", "mode.plain"]
        for insurer in INSURERS:
            terms = _terms(insurer, f"test-{insurer}", allowed_outputs=every_mode)
            terms["quota"]["checks_per_consent_per_day"] = ROOMY_BUDGET
            _sign_and_register(cf, terms)
            _sign_and_register(cf, _terms(insurer, f"claim-check-{insurer}-2026"))
            cf.consents[insurer] = issue_consents(cf.keys, cf.part(insurer)["national_id"],
                                                  insurer)
            client = Client(insurer, state=fed.state, topology=fed.topology,
                            contract_id=f"test-{insurer}", policies=cf.policies)
            client.register_consents(cf.consents[insurer].values())
            cf.clients[insurer] = clients[insurer] = client
        yield cf
    finally:
        for client in clients.values():
            client.close()
        fed.down()


@pytest.fixture(scope="module")
def verdicts(cf) -> dict[str, pd.DataFrame]:
    """Every claim of both insurers checked in each mode."""
    out = {}
    for mode in ("plain", "he", "ss"):
        parts = [cf.clients[i].check(cf.part(i), cf.consents[i], mode) for i in INSURERS]
        out[mode] = pd.concat(parts, ignore_index=True).sort_values("claim_id").reset_index(
            drop=True)
    return out


def _as_truth(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame[VERDICT_COLUMNS].copy()
    for col in ("visit_found", "amount_consistent", "diagnosis_covered"):
        out[col] = out[col].map({True: "true", False: "false"})
    return out.reset_index(drop=True)


# -- correctness -------------------------------------------------------------------------------


@pytest.mark.parametrize("module, banned", [
    ("parties.claims.client", ("fastapi", "starlette", "uvicorn", "parties.services",
                               "parties.claims.service", "parties.claims.compute",
                               "parties.claims.sessions", "parties.insurer_oprf")),
    ("parties.claims.api", ("fastapi", "starlette", "uvicorn", "sqlite3")),
])
def test_the_insurer_side_loads_no_server(module, banned):
    """The SDK and the contract import in a fresh interpreter without a web server."""
    probe = (f"import sys, {module}; print(sorted({{m for m in sys.modules "
             f"if m.split('.')[0] in {banned!r} or m.startswith({banned!r})}}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout


def test_three_modes_agree_with_each_other_and_the_ground_truth(cf, verdicts):
    assert len(cf.claims) >= 500
    assert set(cf.truth["kind"]) >= {"true", "inflated", "fabricated", "uncovered",
                                     "date_off_by_one", "date_off_by_several"}
    truth = cf.truth.sort_values("claim_id").reset_index(drop=True)
    expected = truth[VERDICT_COLUMNS].copy()
    for col in ("visit_found", "amount_consistent", "diagnosis_covered"):
        expected[col] = expected[col].astype(str).str.lower()
    expected["payable"] = expected["payable"].map(lambda v: f"{v:.2f}")
    for mode, frame in verdicts.items():
        assert list(frame.columns) == VERDICT_COLUMNS, mode
        pd.testing.assert_frame_equal(_as_truth(frame), expected, check_dtype=False,
                                      obj=f"{mode} verdicts")
    pd.testing.assert_frame_equal(verdicts["ss"], verdicts["he"])
    pd.testing.assert_frame_equal(verdicts["ss"], verdicts["plain"])


def test_two_visits_in_the_window_pay_only_when_one_visit_passes_every_test(cf):
    """Through the nodes: amount and diagnosis passing on two different visits is not
    payable; both on one visit is (the nested rule of docs/verdict.md)."""
    claims, payable = cf.two_visits["claims"], cf.two_visits["payable"]
    for mode in ("plain", "he", "ss"):
        got = cf.clients["insurer-a"].check(claims, cf.consents["insurer-a"], mode)
        got = got.set_index("claim_id")
        assert got.loc["TWO-split"].tolist() == [True, True, False, "0.00"], mode
        assert got.loc["TWO-one"].tolist() == [True, True, True, payable], mode


def test_every_answer_is_metered_once_with_its_request_id(cf, verdicts):
    answered = [e for e in cf.ledger() if e.kind == "query_answered"
                and e.payload.get("contract_id", "").startswith("test-")]
    assert _wait(lambda: len([e for e in cf.ledger() if e.kind == "query_answered"]) >= 6)
    per_request = {}
    for event in answered:
        per_request.setdefault(event.request_id, []).append(event)
    assert all(len(v) == 1 for v in per_request.values())
    modes = {e.payload["mode"] for e in answered}
    assert modes == {"plain", "he", "ss"}
    for event in answered:
        assert event.actor == "regulator"
        assert event.payload["records_touched"] == 4 * event.payload["claims"]
        assert event.payload["rows_returned"] == event.payload["claims"]
    # one request id follows a batch through every node, its OPRF calls included
    first = next(e for e in answered if e.payload["mode"] == "plain")  # tokens fetched here
    rid = first.request_id
    assert cf.log("regulator", "claims_answered", rid)
    assert cf.log("operator", "claims_computed", rid)
    assert cf.log("operator", "oprf_evaluated", rid)
    assert [e for e in cf.log("health-authority", "request", rid)
            if e["route"] == LEVEL1_STEP.path]


def test_ss_traffic_runs_on_the_nodes_mpc_sessions(cf, verdicts):
    opened = cf.log("operator", "mpc_session_open")
    assert opened and set(opened[-1]["peers"]) == {"regulator", "health-authority"}
    assert cf.log("regulator", "share_table_kept")
    pushed = cf.log("operator", "share_table_pushed")
    assert pushed and all(p["rows"] > 0 for p in pushed)


def test_cli_batch_and_single_claim(cf, tmp_path):
    from scenarios.cli import app

    common = ["--state", str(cf.fed.state.root), "--topology", str(cf.fed.topology_path),
              "--data", str(cf.data), "--contract", "test-insurer-a"]
    consents = tmp_path / "consents.jsonl"
    consents.write_text("".join(
        json.dumps({"national_id": n, "consent": c.model_dump(mode="json")}) + "\n"
        for n, c in cf.consents["insurer-a"].items()))
    out = tmp_path / "verdicts.csv"
    result = CliRunner().invoke(app, ["claim", "check", "--insurer", "insurer-a", "--mode", "ss",
                                      "--claims", str(cf.data / "claims.csv"), "--out", str(out),
                                      "--consents", str(consents), "--batch-size", "100",
                                      *common])
    assert result.exit_code == 0, result.output
    written = pd.read_csv(out, dtype=str)
    assert list(written.columns) == VERDICT_COLUMNS
    truth = cf.truth.set_index("claim_id")
    assert len(written) == len(cf.part("insurer-a"))
    for row in written.itertuples(index=False):
        assert row.visit_found == str(truth.at[row.claim_id, "visit_found"]).lower()
        assert row.payable == f"{truth.at[row.claim_id, 'payable']:.2f}"
    one = tmp_path / "one.csv"
    claim = cf.part("insurer-a").iloc[3]
    result = CliRunner().invoke(app, ["claim", "check", "--insurer", "insurer-a", "--mode", "he",
                                      "--claim-id", claim.claim_id, "--out", str(one),
                                      "--consents", str(consents), *common])
    assert result.exit_code == 0, result.output
    assert pd.read_csv(one, dtype=str).iloc[0]["claim_id"] == claim.claim_id


def test_check_one_explicit_claim(cf):
    claim = cf.part("insurer-b").iloc[0]
    verdict = cf.clients["insurer-b"].check_one(
        national_id=claim.national_id, hospital_id=claim.hospital_id,
        visit_date=claim.visit_date, claimed_fen=int(claim.claimed_fen),
        diagnosis_code=claim.diagnosis_code, claim_id=claim.claim_id,
        consent=cf.consents["insurer-b"][claim.national_id], mode="ss")
    truth = cf.truth.set_index("claim_id").loc[claim.claim_id]
    assert set(verdict) == set(VERDICT_COLUMNS)
    assert verdict["visit_found"] == (str(truth["visit_found"]).lower() == "true")
    assert verdict["payable"] == f"{truth['payable']:.2f}"


# -- what the insurer receives --------------------------------------------------------------


def test_openapi_describes_the_product_with_typed_models(cf):
    with cf.node_client("insurer-a") as client:
        doc = client.request("regulator", "GET", "/openapi.json", kind=Kind.CLAIM).json()
    op = doc["paths"][CHECK.path]["post"]
    ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    response = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert set(response["properties"]) == {"request_id", "mode", "claim_ids",
                                           "operator_answer", "regulator_answer",
                                           "log_entry", "receipt"}
    assert response.get("additionalProperties") is False
    request_ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = doc["components"]["schemas"][request_ref.rsplit("/", 1)[1]]
    assert {"contract_id", "mode", "claims", "operator_envelope"} <= set(request["properties"])


def test_response_holds_only_verdict_material(cf):
    client = cf.clients["insurer-a"]
    part = cf.part("insurer-a").head(20)
    for mode in ("ss", "he"):
        prepared = client.prepare(part, cf.consents["insurer-a"], mode, f"schema-{mode}")
        response = client._http.request(
            "regulator", CHECK.method, CHECK.path, kind=CHECK.kind, content=prepared.body,
            headers={"Content-Type": "application/json", "X-Request-ID": prepared.request_id,
                     REQUEST_SIGNATURE_HEADER: prepared.signature})
        body = response.json()
        ClaimCheckResponse.model_validate(body)  # extra fields are forbidden
        assert set(body) <= set(ClaimCheckResponse.model_fields)
        assert body["claim_ids"] == list(part["claim_id"])
        raw = json.dumps(body)
        for value in part["claimed_fen"].astype(str):
            assert f'"{value}"' not in raw and f": {value}," not in raw
        verdict = client.decode(prepared, ClaimCheckResponse.model_validate(body))
        assert list(verdict.columns) == VERDICT_COLUMNS
        client._prepared.pop(prepared.request_id)
        if mode == "ss":  # the regulator's result share alone: uniform ring elements, not bits
            share = ss_shares.unpack(base64.b64decode(body["regulator_answer"]),
                                     ss_shares.KIND_RESULT)
            assert (np.abs(share) > 2**40).mean() > 0.95


def test_he_insurer_receives_the_verdict_bits_only(cf):
    """Through the nodes, as the insurer: the operator's sealed part opens to nothing but the
    request it answered, and the regulator's part is three nested bits per claim, equal to
    the truth. No ciphertext, slot or count reaches the insurer (the old attack's input)."""
    client = cf.clients["insurer-b"]
    part = cf.part("insurer-b").head(60)
    prepared = client.prepare(part, cf.consents["insurer-b"], "he", "he-leakage")
    response = client.send(prepared)
    head, receipt = open_sealed(prepared.reply_key, ANSWER_PURPOSE, response.operator_answer)
    assert receipt == b"" and head["request_id"] == prepared.log_id
    bits = ss_shares.unpack(response.regulator_answer, ss_shares.KIND_RESULT, (len(part), 3))
    assert np.isin(bits, (0, 1)).all() and (np.diff(bits, axis=1) <= 0).all()
    truth = cf.truth.set_index("claim_id").loc[part["claim_id"]]
    assert list(bits[:, 0] == 1) == [str(v).lower() == "true" for v in truth["visit_found"]]
    client._prepared.pop(prepared.request_id, None)


def test_he_claims_under_the_insurers_own_key_are_refused(cf):
    """The old design's insurer key: claims encrypted under a context the insurer made
    itself (whose noise it knows) are refused before any work, and nothing is billed."""
    from mpc.he import HeDecryptionKey

    client = cf.clients["insurer-b"]
    part = cf.part("insurer-b").head(3)
    own = HeDecryptionKey.generate().public
    real, client._he_public = client.he_public(), own
    try:
        refused = _refused(cf, client, part, cf.consents["insurer-b"], "he", "he-own-key")
    finally:
        client._he_public = real
    assert refused.error == "UnknownHeContext"
    _assert_logged_refusal(cf, "he-own-key", "UnknownHeContext")


def test_he_operator_that_lost_the_regulators_context_is_handed_it_again(cf):
    """An operator whose store lost the public context (rebuilt or restored from an older
    backup) refuses before touching a row; the regulator hands the context over again and
    the claims are answered."""
    client = cf.clients["insurer-b"]
    before, part = cf.part("insurer-b").iloc[:2], cf.part("insurer-b").iloc[2:4]  # not asked
    client.check(before, cf.consents["insurer-b"], "he", request_id="he-before-loss")
    kept = len(cf.log("operator", "he_context_kept", None))
    supervisor.stop_node(cf.fed.state, "operator")
    with sqlite3.connect(cf.fed.state.node("operator").db) as conn:
        conn.execute("DELETE FROM he_public_contexts")
    _restart(cf, "operator")
    verdicts = client.check(part, cf.consents["insurer-b"], "he", request_id="he-after-loss")
    truth = cf.truth.set_index("claim_id").loc[part["claim_id"]]
    assert list(verdicts["payable"]) == [f"{v:.2f}" for v in truth["payable"]]
    assert len(cf.log("operator", "he_context_kept", None)) == kept + 1
    assert _wait(lambda: len(cf.events("query_answered", client.log_id("he-after-loss"))) == 1)


def test_a_forked_log_head_stops_the_claim_service_until_the_witnesses_clear_it(cf):
    """The operator, with its own log key, re-signs its latest head over another root (a
    rewritten history). The witnesses record it, and the serving node fails closed: the
    insurer's claim is refused, nothing computed or billed, until the log is put right and
    each witness's administrator clears its incident."""
    from governance.ledger.tree_head import sign_tree_head
    from parties.ledger.api import CLEAR_INCIDENTS, POLL, WITNESS_INCIDENTS
    from parties.runtime.pki import load_signing_key
    from scenarios.cli import app

    client = cf.clients["insurer-a"]
    part = cf.part("insurer-a").iloc[10:12]
    db = cf.fed.state.node("operator").db
    key = load_signing_key(cf.fed.state, "operator")  # the operator's own log key
    with sqlite3.connect(db) as conn:
        size, log_id, root, ts, signature = conn.execute(
            "SELECT tree_size, log_id, root_hash, timestamp_ms, signature"
            " FROM ledger_tree_heads ORDER BY tree_size DESC LIMIT 1").fetchone()
        forged = sign_tree_head(log_id, size, os.urandom(32), ts + 1, key)
        conn.execute("UPDATE ledger_tree_heads SET root_hash = ?, timestamp_ms = ?,"
                     " signature = ? WHERE tree_size = ?",
                     (bytes.fromhex(forged.root_hash), forged.timestamp_ms,
                      bytes.fromhex(forged.signature), size))
    witnesses = ("health-authority", "regulator")
    runner = CliRunner()
    where = ["--state", str(cf.fed.state.root), "--topology", str(cf.fed.topology_path)]
    try:
        for witness in witnesses:
            with NodeClient(cf.fed.state, cf.fed.topology, witness) as admin, \
                    pytest.raises(RemoteError):
                admin.call(witness, POLL)
        refused = _wait(lambda: _refusal_or_none(cf, client, part, "forked-log"), timeout=20)
        assert refused.error == "LogUnderIncident" and refused.http_status == 503
        assert not cf.log("operator", "claims_compute_started", client.log_id("forked-log"))
        assert not cf.events("query_answered", client.log_id("forked-log"))
        with NodeClient(cf.fed.state, cf.fed.topology, "health-authority") as reader:
            shown = reader.call("health-authority", WITNESS_INCIDENTS)
        assert any(i.evidence["shown"]["root_hash"] == forged.root_hash for i in shown)
        verified = runner.invoke(app, ["ledger", "verify", *where])
        assert verified.exit_code == ExitCode.REFUSED and "open incident" in verified.output
    finally:
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE ledger_tree_heads SET root_hash = ?, timestamp_ms = ?,"
                         " signature = ? WHERE tree_size = ?", (root, ts, signature, size))
        cleared = runner.invoke(app, ["ledger", "incidents", "--node", "health-authority",
                                      "--clear", *where])
        assert cleared.exit_code == 0 and "cleared" in cleared.output, cleared.output
        with NodeClient(cf.fed.state, cf.fed.topology, "regulator") as admin:
            assert admin.call("regulator", CLEAR_INCIDENTS).cleared >= 1
    payable = _wait(lambda: _payable_or_none(client, part, cf.consents["insurer-a"]),
                    timeout=20)
    truth = cf.truth.set_index("claim_id").loc[part["claim_id"]]
    assert payable == [f"{v:.2f}" for v in truth["payable"]]


def test_a_witness_gone_silent_stops_the_claim_service(cf, monkeypatch):
    """The regulator cannot check its fellow witness (here: stopped; a log that stalls the
    gossip looks the same): past the silence bound it answers no claim, since it cannot
    know whether that witness holds an incident. Once they gossip again it answers."""
    from parties.ledger.incidents import SILENCE_ENV

    client = cf.clients["insurer-a"]
    part = cf.part("insurer-a").iloc[14:16]
    monkeypatch.setenv(SILENCE_ENV, "3")
    supervisor.stop_node(cf.fed.state, "regulator")
    _restart(cf, "regulator")  # with the short bound in its environment
    client.tokens(list(part["national_id"]))  # the OPRF chain needs the authority
    try:
        supervisor.stop_node(cf.fed.state, "health-authority")
        # he: no dealer needed, so nothing but the silence can refuse it
        attempt = iter(range(1000))  # a fresh id per attempt: one answered before the bound
        refused = _wait(lambda: _refusal_or_none(cf, client, part,
                                                 f"silent-witness-{next(attempt)}", "he"),
                        timeout=30)
        assert refused.error == "LogUnderIncident" and "health-authority" in refused.detail
    finally:
        _restart(cf, "health-authority")
    payable = _wait(lambda: _payable_or_none(client, part, cf.consents["insurer-a"]),
                    timeout=30)
    truth = cf.truth.set_index("claim_id").loc[part["claim_id"]]
    assert payable == [f"{v:.2f}" for v in truth["payable"]]
    monkeypatch.delenv(SILENCE_ENV)
    supervisor.stop_node(cf.fed.state, "regulator")
    _restart(cf, "regulator")


def _refusal_or_none(cf: ClaimFed, client: Client, part: pd.DataFrame, rid: str,
                     mode: str = "ss"):
    prepared = client.prepare(part, cf.consents["insurer-a"], mode, rid)
    try:
        client.send(prepared)
    except RemoteError as exc:
        return exc
    finally:
        client._prepared.pop(rid, None)
    return None


def _payable_or_none(client: Client, part: pd.DataFrame, consents) -> list[str] | None:
    try:
        return list(client.check(part, consents, "ss")["payable"])
    except (RemoteError, ClaimBatchFailed):  # until the next gossip sees the clearing
        return None


# -- receipts --------------------------------------------------------------------------------


def _answered(cf: ClaimFed, rid: str, rows: slice = slice(30, 31)):
    """A real answer of insurer-a's, not yet taken by its client (the adversary's material)."""
    client = cf.clients["insurer-a"]
    prepared = client.prepare(cf.part("insurer-a").iloc[rows], cf.consents["insurer-a"], "ss",
                              rid)
    client._prepared.pop(rid)
    return client, prepared, client.send(prepared)


def _forked_receipt(cf: ClaimFed, leaf: bytes, index: int) -> Receipt:
    """The operator, with its own log key, shows `leaf` at `index` in a tree whose earlier
    entries it rewrote: a checkpoint that verifies alone and contradicts the real log."""
    from governance.ledger.checkpoint import checkpoint_text, note, origin_of, sign_line
    from governance.ledger.merkle import MemoryTree, leaf_hash
    from governance.ledger.proofs import join_path

    key = load_signing_key(cf.fed.state, "operator")
    with sqlite3.connect(cf.fed.state.node("operator").db) as conn:
        leaves = [bytes(r[0]) for r in conn.execute(
            "SELECT leaf FROM ledger_entries WHERE leaf_index < ? ORDER BY leaf_index",
            (index,))]
    leaves[0] += b" "  # a rewritten history: the first leaf's bytes, and so its hash, differ
    tree = MemoryTree(leaf_hash(x) for x in [*leaves, leaf])
    origin = origin_of("operator", key.public_key())
    text = checkpoint_text(origin, tree.size, tree.root())
    return Receipt(index=index, checkpoint=note(text, [sign_line(text, origin, key)]),
                   inclusion=join_path(tree.inclusion_proof(index)))


def test_every_answer_carries_a_receipt_that_ends_up_against_a_cosigned_checkpoint(cf):
    client, prepared, response = _answered(cf, "receipt-honest")
    view = client.log_view()
    client.take_receipt(prepared, response)
    logged = decode_leaf(response.log_entry)
    assert logged.index == response.receipt.index
    assert logged.entry.event.payload["data_user_signature"] == prepared.signature
    assert len(response.receipt.model_dump_json()) <= 1536
    assert view.confirm(timeout_s=60)  # the witnesses poll every 0.5 s
    assert view.cosigned.tree_size > response.receipt.index
    # kept on the insurer's side: a fresh client of the same insurer starts from it
    again = LogView(view.path, client._http, "operator", *list(view_keys(cf)))
    assert (again.largest, again.cosigned) == (view.largest, view.cosigned)


def view_keys(cf: ClaimFed):
    keys = federation_signing_keys(cf.fed.state, ["operator", "health-authority", "regulator"])
    return keys["operator"], {w: keys[w] for w in ("health-authority", "regulator")}


def test_a_receipt_for_another_entry_or_another_checkpoint_is_refused(cf):
    """The serving node (or the log) hands the insurer a receipt that is not its answer's:
    another request's entry and receipt, this entry under another entry's audit path, or
    the audit path against a checkpoint of another size. Each is refused, the view stays."""
    client, prepared, response = _answered(cf, "receipt-mine")
    _, _, other = _answered(cf, "receipt-other", slice(31, 32))
    view = client.log_view()
    before = (view.largest, list(view.pending))
    bigger = _answered(cf, "receipt-later", slice(32, 33))[2].receipt
    forged = [
        response.model_copy(update={"log_entry": other.log_entry, "receipt": other.receipt}),
        response.model_copy(update={"receipt": other.receipt}),
        response.model_copy(update={"receipt": response.receipt.model_copy(
            update={"inclusion": other.receipt.inclusion})}),
        response.model_copy(update={"receipt": response.receipt.model_copy(
            update={"checkpoint": bigger.checkpoint})}),
    ]
    for tampered in forged:
        with pytest.raises(ReceiptInvalid):
            client.take_receipt(prepared, tampered)
        assert (view.largest, view.pending) == before
    client.take_receipt(prepared, response)  # the genuine one is taken


def test_a_forked_checkpoint_on_the_next_query_is_refused(cf):
    """The operator shows the insurer, on its next query, a checkpoint of a rewritten
    history that carries this answer's entry: it verifies alone under the log's key, but the
    log cannot prove it one history with the checkpoint the insurer kept: refused, typed."""
    client, prepared, response = _answered(cf, "receipt-first")
    client.take_receipt(prepared, response)
    client, prepared, response = _answered(cf, "receipt-forked", slice(33, 34))
    forked = _forked_receipt(cf, response.log_entry, response.receipt.index)
    kept = client.log_view().largest
    with pytest.raises(LogForked):
        client.take_receipt(prepared, response.model_copy(update={"receipt": forked}))
    assert client.log_view().largest == kept
    assert json.loads(client.log_view().path.read_text())["largest"]  # the kept note stays
    client.take_receipt(prepared, response)  # the genuine receipt is still taken


# -- idempotency ---------------------------------------------------------------------------


def test_retried_request_is_answered_again_but_billed_once(cf):
    client = cf.clients["insurer-a"]
    part = cf.part("insurer-a").head(10)
    prepared = client.prepare(part, cf.consents["insurer-a"], "ss", "retry-same-id")
    first = client.decode(prepared, client.send(prepared))
    second = client.decode(prepared, client.send(prepared))
    pd.testing.assert_frame_equal(first, second)
    assert _wait(lambda: len(cf.events("query_answered", "retry-same-id")) == 1)
    time.sleep(0.5)
    assert len(cf.events("query_answered", "retry-same-id")) == 1
    assert cf.usage_rows("retry-same-id") == 1
    client._prepared.pop("retry-same-id")
    other = client.prepare(part.head(5), cf.consents["insurer-a"], "ss", "retry-same-id")
    with pytest.raises(RemoteError) as reused:
        client.send(other)
    assert reused.value.error == "RequestIdReused" and reused.value.http_status == 409


# -- refusals: each is refused, logged, computes nothing, bills nothing ------------------


def _refused(cf: ClaimFed, client: Client, claims: pd.DataFrame, consents, mode: str,
             rid: str) -> RemoteError:
    prepared = client.prepare(claims, consents, mode, rid)
    with pytest.raises(RemoteError) as refused:
        client.send(prepared)
    client._prepared.pop(rid, None)
    assert _wait(lambda: cf.log("regulator", "refused", rid))
    assert not cf.events("query_answered", rid)
    assert cf.usage_rows(rid) == 0
    assert not cf.log("operator", "claims_computed", rid)
    return refused.value


def _assert_logged_refusal(cf: ClaimFed, rid: str, reason: str) -> None:
    events = _wait(lambda: cf.events("query_refused", rid))
    assert [e.payload["reason"] for e in events] == [reason]


def _assert_cause_logged(cf: ClaimFed, node: str, rid: str, cause: str) -> None:
    """The uniform refusal's real cause is in the refusing node's own log and refusal
    record, and nowhere in what the insurer received."""
    logged = cf.log(node, "claim_not_checkable", rid)
    assert {c["cause"] for e in logged for c in e["causes"]} == {cause}
    refused = cf.log(node, "refused", rid)
    assert refused and cause in refused[-1]["detail"]


def test_claim_without_registered_consent_is_refused(cf):
    insurer = "insurer-a"
    claim = cf.part(insurer).head(1)
    nid = claim.iloc[0]["national_id"]
    unregistered = issue_consents(cf.keys, [nid], insurer)
    error = _refused(cf, cf.clients[insurer], claim, unregistered, "ss", "refuse-no-consent")
    assert error.error == "ConsentMissing" and error.http_status == 403
    _assert_logged_refusal(cf, "refuse-no-consent", "ConsentMissing")


def test_revoked_consent_is_refused(cf):
    insurer = "insurer-b"
    claim = cf.part(insurer).head(1)
    nid = claim.iloc[0]["national_id"]
    consent = issue_consents(cf.keys, [nid], insurer)[nid]
    client = cf.clients[insurer]
    client.register_consents([consent])
    key = consent_signing_key(bytes.fromhex(cf.keys[nid]), insurer)  # the app's key for it
    revocation = revoke_consent(consent, key, datetime.now(UTC))
    with cf.node_client("regulator") as admin:
        admin.call("regulator", REVOKE_CONSENT, revocation)
    error = _refused(cf, client, claim, {nid: consent}, "he", "refuse-revoked")
    assert error.error == "ConsentRevoked"
    _assert_logged_refusal(cf, "refuse-revoked", "ConsentRevoked")


def test_expired_contract_is_refused(cf):
    past = {"not_before": "2025-01-01T00:00:00+08:00", "not_after": "2025-12-31T23:59:59+08:00"}
    contract = _sign_and_register(cf, _terms("insurer-a", "expired-insurer-a", validity=past))
    with cf.client("insurer-a", contract) as client:
        error = _refused(cf, client, cf.part("insurer-a").head(3), cf.consents["insurer-a"],
                         "ss", "refuse-expired")
    assert error.error == "ContractExpired"
    _assert_logged_refusal(cf, "refuse-expired", "ContractExpired")


def test_over_quota_is_refused(cf):
    quota = {"queries_per_day": 100, "rows_per_query": 5, "rows_per_day": 50}
    contract = _sign_and_register(cf, _terms("insurer-a", "tiny-insurer-a", quota=quota))
    with cf.client("insurer-a", contract) as client:
        error = _refused(cf, client, cf.part("insurer-a").head(6), cf.consents["insurer-a"],
                         "ss", "refuse-quota")
    assert error.error == "QuotaExceeded" and error.http_status == 429
    _assert_logged_refusal(cf, "refuse-quota", "QuotaExceeded")


def test_plain_is_refused_unless_the_contract_serves_it(cf):
    with cf.client("insurer-a", "claim-check-insurer-a-2026") as client:
        error = _refused(cf, client, cf.part("insurer-a").head(2), cf.consents["insurer-a"],
                         "plain", "refuse-plain")
        assert error.error == "ModeNotAllowed"
        ok = client.check(cf.part("insurer-a").head(2), cf.consents["insurer-a"], "ss")
        assert len(ok) == 2  # the scenario's contract serves ss


def test_token_from_another_domain_is_refused(cf):
    claim = cf.part("insurer-a").head(1)
    nid = claim.iloc[0]["national_id"]
    other_domain = cf.clients["insurer-b"].tokens([nid])[0]
    with cf.client("insurer-a", "test-insurer-a") as client:
        assert client.tokens([nid])[0] != other_domain  # unlinkable across domains
        client._tokens[nid] = other_domain
        error = _refused(cf, client, claim, cf.consents["insurer-a"], "ss", "refuse-domain")
    assert error.error == "ClaimNotCheckable" and error.detail == NOT_CHECKABLE
    _assert_logged_refusal(cf, "refuse-domain", "ClaimNotCheckable")
    _assert_cause_logged(cf, "operator", "refuse-domain", "unknown_token")


def test_consent_of_another_person_is_refused_at_the_operator(cf):
    """The insurer shows A's registered consent (the regulator, which sees no person, passes
    it) for B's claim: A's key is not the key delivered for the person behind B's token."""
    part = cf.part("insurer-a")
    a, b = part["national_id"].unique()[2:4]
    claim_b = part[part["national_id"] == b].head(1)
    consent_a = cf.consents["insurer-a"][a]
    with cf.client("insurer-a", "test-insurer-a") as client:
        error = _refused(cf, client, claim_b, {b: consent_a}, "ss", "refuse-person-operator")
    assert error.error == "ClaimNotCheckable" and error.detail == NOT_CHECKABLE
    _assert_logged_refusal(cf, "refuse-person-operator", "ClaimNotCheckable")
    _assert_cause_logged(cf, "operator", "refuse-person-operator", "consent_key_mismatch")


def test_a_query_carrying_a_copied_commitment_is_refused_before_anything_runs(cf):
    """The v1 query field `subject_commitment` is gone: an insurer that copies a commitment
    from some consent into its query gets a 422 naming the field, nothing is reserved."""
    part = cf.part("insurer-a")
    nid = part["national_id"].unique()[4]
    claim = part[part["national_id"] == nid].head(1)
    with cf.client("insurer-a", "test-insurer-a") as client:
        prepared = client.prepare(claim, {nid: cf.consents["insurer-a"][nid]}, "ss",
                                  "copied-commitment")
        body = json.loads(prepared.body)
        body["claims"][0]["subject_commitment"] = "ab" * 32
        client._prepared.pop("copied-commitment", None)
    response = raw_request(cf.fed, "insurer-a", "regulator", CHECK.method, CHECK.path,
                           content=json.dumps(body).encode(),
                           headers={"Content-Type": "application/json",
                                    REQUEST_ID_HEADER: prepared.request_id})
    assert response.status_code == 422
    assert "subject_commitment" in response.text
    assert not cf.log("regulator", "claims_received", "copied-commitment")
    assert cf.usage_rows("copied-commitment") == 0


# -- malformed claims: refused before anything is sent, computed or billed ---------------

MALFORMED = [
    ("diagnosis_code", "E119"),  # undotted
    ("claimed_fen", "-500"),
    ("visit_date", "04/28/2025"),
    ("visit_date", "28/04/2025"),
    ("visit_date", "20250428"),
    ("visit_date", "2025-04-28T23:00"),
]


def _calls_from(cf: ClaimFed, insurer: str) -> int:
    """Requests the regulator has served to `insurer` so far (any route)."""
    return len([e for e in read_log(cf.fed.state.node("regulator").log)
                if e["event"] == "request" and e.get("caller") == insurer])


def _claim_check_cli(cf: ClaimFed, tmp_path: Path, monkeypatch, claims: pd.DataFrame
                     ) -> tuple[int, str]:
    """`cogov claim check` of `claims` as insurer-a, its consents given in a file."""
    from parties.runtime.cli import console
    from scenarios.cli import app

    monkeypatch.setattr(console, "width", 1000)  # an error line is not wrapped at 80
    path, consents = tmp_path / "claims.csv", tmp_path / "consents.jsonl"
    claims.to_csv(path, index=False)
    consents.write_text("".join(
        json.dumps({"national_id": n, "consent": c.model_dump(mode="json")}) + "\n"
        for n, c in cf.consents["insurer-a"].items()))
    result = CliRunner().invoke(app, [
        "claim", "check", "--insurer", "insurer-a", "--claims", str(path),
        "--out", str(tmp_path / "verdicts.csv"), "--consents", str(consents),
        "--data", str(cf.data), "--contract", "test-insurer-a",
        "--state", str(cf.fed.state.root), "--topology", str(cf.fed.topology_path)])
    return result.exit_code, result.output


def _assert_one_line_refusal(code: int, output: str, error: str, *words: str) -> None:
    lines = output.strip().splitlines()
    assert code == ExitCode.BAD_INPUT, output
    assert len(lines) == 1 and "Traceback" not in output, output
    assert lines[0].startswith(f"{error}: "), output
    for word in words:
        assert word in lines[0], (word, output)


@pytest.mark.parametrize("field, value", MALFORMED)
def test_cli_refuses_a_malformed_claim_in_one_line_before_sending(cf, tmp_path, monkeypatch,
                                                                 field, value):
    claims = cf.part("insurer-a").head(5).astype({field: object})
    claims.loc[2, field] = value
    before = _calls_from(cf, "insurer-a")
    code, output = _claim_check_cli(cf, tmp_path, monkeypatch, claims)
    _assert_one_line_refusal(code, output, "MalformedInput", field, claims.loc[2, "claim_id"],
                             value)
    assert _calls_from(cf, "insurer-a") == before  # no consent, token or claim was sent
    assert not (tmp_path / "verdicts.csv").exists()


def test_client_refuses_a_date_that_is_not_iso_before_sending(cf):
    claim = cf.part("insurer-b").iloc[0]
    before = _calls_from(cf, "insurer-b")
    for date in ("04/28/2025", "28/04/2025", "20250428", "2025-04-28T23:00"):
        with pytest.raises(MalformedInput, match="visit_date") as refused:
            cf.clients["insurer-b"].check_one(
                national_id=claim.national_id, hospital_id=claim.hospital_id, visit_date=date,
                claimed_fen=int(claim.claimed_fen), diagnosis_code=claim.diagnosis_code,
                consent=cf.consents["insurer-b"][claim.national_id], claim_id="C-date")
        assert "claim C-date" in str(refused.value)
    assert _calls_from(cf, "insurer-b") == before


def test_cli_refuses_a_hospital_not_in_the_topology(cf, tmp_path, monkeypatch):
    claims = cf.part("insurer-a").head(5).copy()
    claims.loc[1, "hospital_id"] = "hospital-9"
    before = _calls_from(cf, "insurer-a")
    code, output = _claim_check_cli(cf, tmp_path, monkeypatch, claims)
    _assert_one_line_refusal(code, output, "HospitalNotInTopology", "hospital-9",
                             claims.loc[1, "claim_id"])
    assert _calls_from(cf, "insurer-a") == before


def test_client_refuses_a_hospital_not_in_the_topology(cf):
    claims = cf.part("insurer-a").head(3).copy()
    claims.loc[0, "hospital_id"] = "hospital-9"
    before = _calls_from(cf, "insurer-a")
    with pytest.raises(HospitalNotInTopology, match="hospital-9"):
        cf.clients["insurer-a"].check(claims, cf.consents["insurer-a"], "ss")
    assert _calls_from(cf, "insurer-a") == before


def test_hospital_not_in_the_topology_sent_raw_is_refused_by_the_operator(cf):
    """A client that skips the SDK's check: the operator, who alone sees the hospitals,
    refuses the batch before reading a row; the regulator logs it and bills nothing."""
    claims = cf.part("insurer-a").head(2).copy()
    claims.loc[1, "hospital_id"] = "hospital-9"
    error = _refused(cf, cf.clients["insurer-a"], claims, cf.consents["insurer-a"], "ss",
                     "refuse-hospital")
    assert isinstance(error, HospitalNotInTopology)
    assert error.error == "HospitalNotInTopology" and error.http_status == 422
    assert "claim 1" in error.detail and "hospital-9" in error.detail
    assert cf.log("operator", "refused", "refuse-hospital")
    assert not cf.log("operator", "claims_compute_started", "refuse-hospital")
    _assert_logged_refusal(cf, "refuse-hospital", "HospitalNotInTopology")


def test_insurer_calling_the_operator_directly_is_refused(cf):
    with cf.node_client("insurer-a") as client:
        with pytest.raises(FlowNotAllowed):
            client.call("operator", COMPUTE, content=b"x")
        with pytest.raises(RemoteError) as refused:
            client.request("operator", COMPUTE.method, COMPUTE.path, kind=COMPUTE.kind,
                           content=b"x", check_flow=False,
                           headers={"X-Request-ID": cf.clients["insurer-a"].log_id("refuse-flow")})
    assert refused.value.error == "FlowNotAllowed" and refused.value.http_status == 403
    assert _wait(lambda: cf.log("operator", "refused", "refuse-flow"))
    assert not cf.log("operator", "claims_computed", "refuse-flow")
    assert not cf.events("query_answered", "refuse-flow")


# -- crashes ---------------------------------------------------------------------------------


def _restart(cf: ClaimFed, node: str) -> None:
    supervisor.start_node(cf.fed.state, cf.fed.topology_path, node)
    status = supervisor.wait_healthy(cf.fed.state, cf.fed.topology, [node])
    assert status[node] == "ok", status


def _repeat(mode: str) -> int:
    return REPEAT // 8 if mode == "he" else REPEAT


def _kill_mid_batch(cf: ClaimFed, node: str, mode: str, rid: str, wait_event: tuple[str, str]):
    """Start a large batch, kill -9 `node` while it runs; return the batch's outcome."""
    import os
    import signal

    insurer = "insurer-a"
    client = cf.clients[insurer]
    part = cf.part(insurer)
    # same claims, new ids: 9,120 (he: 1,140; its ciphertexts carry 36 KB per claim)
    big = pd.concat([part] * _repeat(mode), ignore_index=True)
    big["claim_id"] = [f"K{i:06d}" for i in range(len(big))]
    client.batch_size = len(big)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["verdicts"] = client.check(big, cf.consents[insurer], mode, request_id=rid)
        except Exception as exc:  # the outcome under test
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    watched, event = wait_event
    assert _wait(lambda: cf.log(watched, event, rid), timeout=60)
    pid = supervisor.running_pid(cf.fed.state, node)
    os.kill(pid, signal.SIGKILL)
    worker.join(120)
    return client, big, outcome


@pytest.mark.slow
@pytest.mark.parametrize("node, mode", [("operator", "he"), ("regulator", "ss")])
def test_killed_computing_node_fails_the_batch_then_a_retry_succeeds(cf, node, mode):
    rid = f"crash-{node}"
    client, big, outcome = _kill_mid_batch(cf, node, mode, rid,
                                           ("operator", "claims_compute_started"))
    try:
        assert "error" in outcome, "the batch finished before the kill"
        error = outcome["error"]
        assert isinstance(error, ClaimBatchFailed)
        assert error.http_status in (502, 503)
        assert error.request_id == rid
        assert not cf.events("query_answered", rid)
    finally:
        _restart(cf, node)
    verdicts = client.check(big, cf.consents["insurer-a"], mode, request_id=rid)
    client.batch_size = 2000
    claim_ids = pd.concat([cf.part("insurer-a")] * _repeat(mode))["claim_id"]
    expected = cf.truth.set_index("claim_id").loc[claim_ids, "payable"].map(
        lambda v: f"{v:.2f}")
    assert list(verdicts["payable"]) == list(expected)
    assert _wait(lambda: len(cf.events("query_answered", rid)) == 1, timeout=20)
    time.sleep(0.5)
    assert len(cf.events("query_answered", rid)) == 1
    assert cf.usage_rows(rid) == 1


def test_regulator_recovery_releases_reservations_of_dead_requests(cf):
    """A request that died with the regulator keeps no quota reservation after restart."""
    conn = sqlite3.connect(f"file:{cf.fed.state.node('regulator').db}?mode=ro", uri=True)
    try:
        pending = conn.execute("SELECT COUNT(*) FROM claim_requests WHERE status = 'pending'"
                               ).fetchone()[0]
    finally:
        conn.close()
    assert pending == 0


@pytest.mark.parametrize("rotate", ["k2", "k1"])
def test_claims_after_a_key_rotation_renew_cached_tokens_once(cf, verdicts, rotate):
    """After a rotation the operator rebuilds its table; a client's cached tokens are
    refused once (logged, not billed), fetched again, and the verdicts are unchanged."""
    from scenarios.cli import app

    insurer = "insurer-a"
    client = cf.clients[insurer]
    # Other claims for each rotation: the same batch again would be the same question, and
    # the regulator answers a question asked before from its book, without the operator.
    first = 0 if rotate == "k2" else 12
    claims = cf.part(insurer).iloc[first:first + 12]
    assert set(claims["national_id"]) <= client._tokens.keys()  # cached by earlier checks
    args = ["govern", "rotate-k1"] if rotate == "k1" else ["domain", "rotate", _domain_of(
        cf, insurer)]
    result = CliRunner().invoke(app, [*args, "--state", str(cf.fed.state.root),
                                      "--topology", str(cf.fed.topology_path)])
    assert result.exit_code == 0, result.output
    rid = f"after-{rotate}-rotation"
    fresh = client.check(claims, cf.consents[insurer], "ss", request_id=rid)
    expected = verdicts["ss"].set_index("claim_id").loc[list(claims["claim_id"])]
    pd.testing.assert_frame_equal(fresh.set_index("claim_id"), expected)
    _assert_logged_refusal(cf, rid, "ClaimNotCheckable")
    _assert_cause_logged(cf, "operator", rid, "unknown_token")
    assert cf.usage_rows(rid) == 0 and cf.usage_rows(f"{rid}-renewed") == 1


def _domain_of(cf: ClaimFed, insurer: str) -> str:
    with cf.node_client("operator") as client:
        domains = client.call("operator", LIST_DOMAINS)
    return next(d.domain_id for d in domains if d.data_user == insurer)


# -- evidence: request ids at the edge, signed requests, meters that prove themselves ------


def _evidence_counts(cf: ClaimFed) -> dict:
    ledger = cf.ledger()
    conn = sqlite3.connect(f"file:{cf.fed.state.node('regulator').db}?mode=ro", uri=True)
    try:
        usage, requests, budget = (conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                                   for t in ("contract_usage", "claim_requests",
                                             "claim_check_budget"))
    finally:
        conn.close()
    return {"query entries": sum(e.kind.startswith("query_") for e in ledger),
            "usage": usage, "requests": requests, "budget": budget,
            "received": len(cf.log("regulator", "claims_received")),
            "computed": len(cf.log("operator", "claims_compute_started"))}


def _fresh_tokens(client: Client, claims: pd.DataFrame) -> None:
    """Fetch these claimants' tokens anew: earlier tests rotate keys, and a stale token
    would be refused (and the batch renewed under another request id)."""
    ids = list(claims["national_id"])
    for nid in ids:
        client._tokens.pop(nid, None)
    client.tokens(ids)


BAD_REQUEST_IDS = ["", "a/b", "a+b", "a=b", "a b", "a:b", "x" * 129, "claim;drop", "%2F"]


def test_bad_request_ids_are_refused_at_the_edge(cf):
    """Each bad `X-Request-ID` (the issue's `/`, `+`, `=`, space, over 128 characters, ...),
    on a request the insurer signed for it: a typed 400 before any handler runs, logged,
    and nothing is reserved, computed, charged or metered."""
    client = cf.clients["insurer-a"]
    part = cf.part("insurer-a").head(2)
    prepared = client.prepare(part, cf.consents["insurer-a"], "ss", "edge-ids")
    client._prepared.pop("edge-ids")
    before = _evidence_counts(cf)
    for bad in BAD_REQUEST_IDS:
        with pytest.raises(RemoteError) as refused:
            client._http.request(
                "regulator", CHECK.method, CHECK.path, kind=CHECK.kind, content=prepared.body,
                headers={"Content-Type": "application/json", "X-Request-ID": bad,
                         REQUEST_SIGNATURE_HEADER: prepared.signature})
        assert refused.value.http_status == 400 and refused.value.error == "InvalidRequestId"
        assert bad == "" or bad not in refused.value.detail
    logged = [e for e in cf.log("regulator", "refused") if e["error"] == "InvalidRequestId"]
    assert len(logged) >= len(BAD_REQUEST_IDS)
    assert all(e["request_id"].startswith("rq-") for e in logged)
    time.sleep(0.5)  # metering would run off the request path
    assert _evidence_counts(cf) == before


def test_national_id_as_request_id_never_reaches_the_log(cf):
    """The insurer names a request after the claimant's national id: it is answered and
    metered under the derived log id, and the id appears in no log entry, node log or
    refusal record of the serving and computing nodes."""
    client = cf.clients["insurer-a"]
    part = cf.part("insurer-a").iloc[40:42].reset_index(drop=True)
    national_id = str(part["national_id"][0])
    assert len(national_id) == 18
    _fresh_tokens(client, part)
    verdicts = client.check(part, cf.consents["insurer-a"], "ss", request_id=national_id)
    assert len(verdicts) == 2
    log_id = client.log_id(national_id)
    assert _wait(lambda: cf.events("query_answered", national_id))[0].request_id == log_id
    conn = sqlite3.connect(f"file:{cf.fed.state.node('operator').db}?mode=ro", uri=True)
    try:
        leaves = b"".join(bytes(r[0]) for r in conn.execute("SELECT leaf FROM ledger_entries"))
    finally:
        conn.close()
    assert national_id.encode() not in leaves
    for node in ("regulator", "operator", "health-authority"):
        assert national_id not in cf.fed.state.node(node).log.read_text(), node
        conn = sqlite3.connect(f"file:{cf.fed.state.node(node).db}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT request_id FROM refusals").fetchall()
        finally:
            conn.close()
        assert national_id not in {r[0] for r in rows}, node


def test_unsigned_or_badly_signed_requests_are_refused_and_not_billed(cf):
    """The insurer's signature is what makes a meter billable, so the serving node serves
    nothing without it: no signature, another node's signature, and a signature of another
    request are each refused (403, logged) before anything is reserved or computed."""
    client = cf.clients["insurer-a"]
    part = cf.part("insurer-a").iloc[50:52].reset_index(drop=True)
    _fresh_tokens(client, part)
    prepared = client.prepare(part, cf.consents["insurer-a"], "ss", "unsigned-check")
    other = client.prepare(part.head(1), cf.consents["insurer-a"], "ss", "other-signed")
    stranger = sign_request(load_signing_key(cf.fed.state, "insurer-b"), signed_request(
        prepared.log_id, "insurer-a", ClaimCheckRequest.model_validate_json(prepared.body)))
    before = _evidence_counts(cf)
    for signature in (None, stranger, other.signature, "00" * 64, "not-hex"):
        headers = {"Content-Type": "application/json", "X-Request-ID": "unsigned-check"}
        if signature is not None:
            headers[REQUEST_SIGNATURE_HEADER] = signature
        with pytest.raises(RemoteError) as refused:
            client._http.request("regulator", CHECK.method, CHECK.path, kind=CHECK.kind,
                                 content=prepared.body, headers=headers)
        assert refused.value.http_status == 403
        assert refused.value.error == "RequestSignatureInvalid"
    time.sleep(0.5)
    assert _evidence_counts(cf) == before
    assert len([e for e in cf.log("regulator", "refused", "unsigned-check")
                if e["error"] == "RequestSignatureInvalid"]) == 5
    # The honest request, signed, is answered and its meter proves itself.
    client.decode(prepared, client.send(prepared))
    entry = _wait(lambda: cf.events("query_answered", "unsigned-check"))[0]
    assert entry.payload["data_user_signature"] == prepared.signature
    client._prepared.clear()


def test_real_meters_prove_themselves_and_are_billed(cf, verdicts):
    """Every meter the regulator appended for the checks above carries insurer-a's valid
    signature: billing over the real log finds no anomaly and bills each one."""
    conn = sqlite3.connect(f"file:{cf.fed.state.node('operator').db}?mode=ro", uri=True)
    try:
        leaves = [decode_leaf(bytes(r[0])) for r in
                  conn.execute("SELECT leaf FROM ledger_entries ORDER BY leaf_index")]
    finally:
        conn.close()
    terms = parse_contract(_terms("insurer-a", "test-insurer-a"))
    keys = federation_signing_keys(cf.fed.state, [n.name for n in cf.fed.topology.nodes])
    period = datetime.now(UTC).astimezone(terms.timezone).strftime("%Y-%m")
    bill = statement(terms, period, leaves, "regulator", keys)
    answered = {e.entry.event.request_id for e in leaves
                if e.entry.event.kind == "query_answered"
                and e.entry.event.payload.get("contract_id") == "test-insurer-a"}
    assert answered and bill.anomalies == ()
    assert bill.meters.queries == len(answered)


def test_log_outage_during_a_query_withholds_the_answer_and_bills_nothing(cf):
    """The log's store is locked by another writer (a real outage of the log: the operator
    still computes, its log cannot commit). The answer is computed but never leaves: a
    typed 503, its quota given back, its meter voided by a `query_withheld` entry once the
    log is back (the slow append may commit late), nothing billed. A retry with the same
    request id is then answered and billed once."""
    client = cf.clients["insurer-a"]
    part = cf.part("insurer-a").iloc[60:62].reset_index(drop=True)
    _fresh_tokens(client, part)  # OPRF evaluations are logged too: not under the lock
    rid = "log-outage"
    lock = sqlite3.connect(cf.fed.state.node("operator").db, timeout=5, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the log's appends wait, then fail
    try:
        with pytest.raises(ClaimBatchFailed) as withheld:
            client.check(part, cf.consents["insurer-a"], "ss", request_id=rid)
    finally:
        lock.rollback()
        lock.close()
    assert withheld.value.error == "AnswerNotLogged" and withheld.value.http_status == 503
    assert cf.log("operator", "claims_computed", rid)  # the answer existed ...
    assert cf.log("regulator", "answer_withheld", rid)  # ... and was kept back
    assert cf.usage_rows(rid) == 0
    voided = _wait(lambda: cf.events("query_withheld", rid), timeout=15)
    assert voided[0].actor == "regulator"

    def leaves() -> list:
        conn = sqlite3.connect(f"file:{cf.fed.state.node('operator').db}?mode=ro", uri=True)
        try:
            return [decode_leaf(bytes(r[0])) for r in
                    conn.execute("SELECT leaf FROM ledger_entries ORDER BY leaf_index")]
        finally:
            conn.close()

    # The regulator gave up on the append, the log committed it once the lock was gone:
    # the withheld answer's meter is in the log, and only the void keeps it off the bill.
    landed = _wait(lambda: [e for e in leaves()
                            if e.entry.signature == voided[0].payload["meter_signature"]])
    assert landed and landed[0].entry.event.kind == "query_answered"
    terms = parse_contract(_terms("insurer-a", "test-insurer-a"))
    keys = federation_signing_keys(cf.fed.state, [n.name for n in cf.fed.topology.nodes])
    period = datetime.now(UTC).astimezone(terms.timezone).strftime("%Y-%m")
    log_id = client.log_id(rid)
    bill = statement(terms, period, leaves(), "regulator", keys)
    billed = {i for line in bill.lines for i in line.entry_indices}
    assert landed[0].index not in billed and not bill.anomalies
    assert not [e for e in leaves() if e.index in billed and e.entry.event.request_id == log_id]
    # The log is back: the same request is answered, and billed once.
    verdicts = client.check(part, cf.consents["insurer-a"], "ss", request_id=rid)
    assert len(verdicts) == 2 and cf.usage_rows(rid) == 1
    meters = [e for e in cf.events("query_answered", rid)
              if e.payload.get("data_user_signature")]
    assert meters and cf.log("regulator", "claims_answered", rid)


def test_serving_node_killed_before_the_release_voids_the_meter(cf):
    """kill -9 of the regulator while its answer waits for the log (the log's store held
    by another writer): the meter commits once the log frees up, but the answer never
    left. At restart the regulator gives the quota back and voids that meter
    (`query_withheld`), so nothing is billed; a retry is answered and billed once."""
    import os
    import signal

    client = cf.clients["insurer-a"]
    part = cf.part("insurer-a").iloc[70:72].reset_index(drop=True)
    _fresh_tokens(client, part)
    rid = "killed-before-release"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["verdicts"] = client.check(part, cf.consents["insurer-a"], "ss",
                                               request_id=rid)
        except Exception as exc:  # the outcome under test
            outcome["error"] = exc

    lock = sqlite3.connect(cf.fed.state.node("operator").db, timeout=5, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        worker = threading.Thread(target=run)
        worker.start()
        assert _wait(lambda: cf.log("operator", "claims_computed", rid), timeout=30)
        time.sleep(1.5)  # the regulator now waits (up to 5 s) for the log to take the meter
        os.kill(supervisor.running_pid(cf.fed.state, "regulator"), signal.SIGKILL)
        worker.join(60)
    finally:
        lock.rollback()
        lock.close()
    assert isinstance(outcome.get("error"), ClaimBatchFailed)
    meter = _wait(lambda: cf.events("query_answered", rid))  # committed after all
    _restart(cf, "regulator")
    voided = _wait(lambda: cf.events("query_withheld", rid), timeout=15)
    assert voided[0].payload["meter_signature"] == _meter_signature(cf, meter[0])
    assert voided[0].payload["reason"] == "node_restarted"
    assert cf.usage_rows(rid) == 0
    verdicts = client.check(part, cf.consents["insurer-a"], "ss", request_id=rid)
    assert len(verdicts) == 2 and cf.usage_rows(rid) == 1


def _meter_signature(cf: ClaimFed, event) -> str:
    conn = sqlite3.connect(f"file:{cf.fed.state.node('operator').db}?mode=ro", uri=True)
    try:
        leaves = [decode_leaf(bytes(r[0]))
                  for r in conn.execute("SELECT leaf FROM ledger_entries")]
    finally:
        conn.close()
    return next(e.entry.signature for e in leaves if e.entry.event == event)
