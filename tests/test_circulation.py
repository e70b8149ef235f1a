"""Hospitals -> health authority -> operator on real node processes over mutual TLS.

The module's federation starts empty: hospitals export, the authority governs,
a first publication is interrupted halfway and then resumed; the CLI's
`cogov govern ingest` then runs the whole chain again (idempotent).
"""

import json
import os
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from governance.ledger import decode_leaf, sign_event
from governance.ledger.errors import EntrySignatureInvalid
from governance.scan import _match_counts, scan_path
from parties.domains.api import LEVEL1_STEP, LIST_DOMAINS
from parties.ingest.api import (
    ASSET_REGISTERED,
    CIRCULATION_SUMMARY,
    CIRCULATION_VISITS,
    COMPLETE_EXPORT,
    EXPORT_BATCHES,
    GOVERNANCE_SUMMARY,
    HOSPITAL_EXPORT,
    PUBLISH,
    ExportComplete,
    ExportRequest,
    ExportResult,
    Publication,
    PublishRequest,
)
from parties.ingest.authority import publish, visits_digest
from parties.ingest.circulated import VISITS_TABLE
from parties.ingest.circulation import seal_batch, unregistered_holdings
from parties.ingest.governed import governed_visits
from parties.ingest.hospital import read_export
from parties.ingest.registration import export_digest, sign_registration
from parties.ledger.client import append_entry, append_signed
from parties.ledger.operator_log import operator_log
from parties.node import open_node
from parties.runtime.batch_routes import DIGEST_HEADER, digest, table_to_ipc
from parties.runtime.batches import send_batches
from parties.runtime.client import NodeClient
from parties.runtime.errors import RemoteError
from parties.runtime.pki import load_signing_key
from parties.runtime.routes import Kind
from parties.runtime.sealing import sealing_public_key
from scenarios.claim_check.generator import generate
from tests.federation import Federation

ALL_NODES = ["hospital-1", "hospital-2", "hospital-3", "health-authority", "operator",
             "regulator", "insurer-a", "insurer-b"]
PATIENTS = 400


@dataclass
class Ingested:
    fed: Federation
    data: Path
    exports: dict[str, ExportResult] = field(default_factory=dict)
    interrupted_rows: int = 0
    interrupted_batches: int = 0
    resumed: Publication | None = None

    def client(self, node: str) -> NodeClient:
        return NodeClient(self.fed.state, self.fed.topology, node, timeout=300)

    def cli(self, *args: str) -> str:
        from scenarios.cli import app

        result = CliRunner().invoke(app, [*args, "--state", str(self.fed.state.root),
                                          "--topology", str(self.fed.topology_path)])
        assert result.exit_code == 0, result.output
        return result.output

    def db(self, node: str) -> Path:
        return self.fed.state.node(node).db


class Interrupted(Exception):
    pass


def export_all(ing: Ingested) -> None:
    for raw in sorted((ing.data / "raw").iterdir()):
        with ing.client(raw.stem) as client:
            ing.exports[raw.stem] = client.call(
                raw.stem, HOSPITAL_EXPORT, ExportRequest(path=str(raw), batch_rows=100))


def start(tmp_path_factory, env: dict[str, str] | None = None, *, cli_ingest: bool) -> Ingested:
    """A federation with generated data; with `cli_ingest`, `cogov govern ingest` already ran."""
    root = tmp_path_factory.mktemp("circ")
    generate(root / "data", patients=PATIENTS, claims=30, seed=11, progress=False)
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        fed = Federation(root, nodes=ALL_NODES)
        fed.up()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ing = Ingested(fed, root / "data")
    if cli_ingest:
        ing.cli("govern", "ingest", "--data", str(ing.data), "--batch-rows", "200")
    return ing


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    ing = start(tmp_path_factory, cli_ingest=False)
    try:
        export_all(ing)
        # A first publication, interrupted after half of its batches, as the authority runs it.
        ha = open_node(ing.fed.state, ing.fed.topology, "health-authority")

        def stop_halfway(done: int, total: int) -> None:
            if done == total // 2:
                ing.interrupted_batches = done
                raise Interrupted

        with pytest.raises(Interrupted):
            publish(ha, batch_rows=100, on_batch=stop_halfway)
        ha.store.close()
        with sqlite3.connect(ing.db("operator")) as conn:
            (ing.interrupted_rows,) = conn.execute(
                f"SELECT COUNT(*) FROM {VISITS_TABLE}").fetchone()
        with ing.client("health-authority") as client:
            ing.resumed = client.call("health-authority", PUBLISH,
                                      PublishRequest(batch_rows=100))
        yield ing
    finally:
        ing.fed.down()


def truth(ing: Ingested):
    return pq.read_table(ing.data / "ground_truth" / "visits.parquet").to_pandas()


def test_governed_copy_at_the_authority_matches_the_ground_truth(ingested):
    gt = truth(ingested)
    with ingested.client("health-authority") as client:
        summary = client.call("health-authority", GOVERNANCE_SUMMARY)
    assert set(summary.hospitals) == set(gt["hospital_id"])
    for hospital, part in gt.groupby("hospital_id"):
        held = summary.hospitals[hospital]
        assert held.rows == len(part)
        assert held.persons == part["national_id"].nunique()
        assert held.digest == visits_digest(part)  # reopened from the sealed store
        assert ingested.exports[hospital].governed.digest == held.digest
    assert summary.consumer_keys == 0  # keys came with the CLI only


def test_export_is_scanned_and_graded_by_content(ingested):
    governed = ingested.exports["hospital-3"].governed
    # Innocuous column names, sensitive content: found by the scan, not by the name.
    assert governed.flagged["cust_ref"] == "national_id"
    assert governed.flagged["holder"] == "name"
    assert governed.raw_grades["cust_ref"] == "L4"
    assert governed.grades["diagnosis_code"] == "L4"
    assert {"national_id", "diagnosis_code"} <= set(governed.sealed_fields)


def test_gb18030_export_is_governed_to_the_rows_of_its_original(ingested):
    """hospital-2's export again, as a GB18030 CSV (Chinese column names and values)."""
    frame = pd.read_parquet(ingested.data / "raw" / "hospital-2.parquet")
    path = ingested.data / "gb18030" / "hospital-2.csv"
    path.parent.mkdir(exist_ok=True)
    frame.to_csv(path, index=False, encoding="gb18030")
    with ingested.client("hospital-2") as client:
        with pytest.raises(RemoteError) as wrong:
            client.call("hospital-2", HOSPITAL_EXPORT, ExportRequest(path=str(path),
                                                                     encoding="utf-8"))
        twin = client.call("hospital-2", HOSPITAL_EXPORT, ExportRequest(path=str(path)))
    assert (wrong.value.error, wrong.value.http_status) == ("UnreadableText", 400)
    original = ingested.exports["hospital-2"]
    assert twin.stream != original.stream and twin.rows == original.rows
    assert twin.governed.digest == original.governed.digest
    assert twin.governed.mapped == original.governed.mapped
    with ingested.client("health-authority") as client:
        held = client.call("health-authority", GOVERNANCE_SUMMARY).hospitals["hospital-2"]
    assert (held.rows, held.digest) == (original.rows, original.governed.digest)


def test_interrupted_publication_resumes_without_duplicates(ingested):
    gt = truth(ingested)
    resumed = ingested.resumed
    assert 0 < ingested.interrupted_rows < len(gt)
    assert ingested.interrupted_rows == ingested.interrupted_batches * 100
    assert resumed.skipped == ingested.interrupted_batches
    assert resumed.sent == resumed.batches - ingested.interrupted_batches
    with ingested.client("operator") as client:
        held = client.call("operator", CIRCULATION_SUMMARY)
    assert held.rows == resumed.rows == resumed.registered_rows == len(gt)
    assert held.digest == resumed.digest
    assert held.by_hospital == gt.groupby("hospital_id").size().to_dict()
    assert held.sealed_columns == ["diagnosis_code"]


def test_resent_batches_add_nothing(ingested):
    with ingested.client("health-authority") as client:
        again = client.call("health-authority", PUBLISH, PublishRequest(batch_rows=100))
    assert again.sent == 0 and again.skipped == again.batches
    # The same visits under a new stream (sealed afresh) only update rows in place.
    ha = open_node(ingested.fed.state, ingested.fed.topology, "health-authority")
    try:
        frame = governed_visits(ha).head(50)
        key = sealing_public_key(ha.signing_public_keys()["operator"])
        batch = seal_batch(frame, ["diagnosis_code"], key, "v-replay", 0, {})
        data = table_to_ipc(batch)
        replay = {"stream": "v-replay", "idx": 0}
        with ingested.client("health-authority") as client:
            first = client.call("operator", CIRCULATION_VISITS.batch, params=replay,
                                content=data, headers={DIGEST_HEADER: digest(data)})
            second = client.call("operator", CIRCULATION_VISITS.batch, params=replay,
                                 content=data, headers={DIGEST_HEADER: digest(data)})
            other = table_to_ipc(seal_batch(frame, ["diagnosis_code"], key, "v-replay", 0, {}))
            with pytest.raises(RemoteError) as conflict:
                client.call("operator", CIRCULATION_VISITS.batch, params=replay, content=other)
    finally:
        ha.store.close()
    assert first.duplicate is False and second.duplicate is True
    assert conflict.value.http_status == 409 and conflict.value.error == "BatchConflict"
    with ingested.client("operator") as client:
        held = client.call("operator", CIRCULATION_SUMMARY)
    assert held.rows == len(truth(ingested))
    assert held.digest == again.digest


def test_batch_sealed_for_the_operator_cannot_be_moved_to_another_batch(ingested):
    ha = open_node(ingested.fed.state, ingested.fed.topology, "health-authority")
    try:
        frame = governed_visits(ha).head(5)
        key = sealing_public_key(ha.signing_public_keys()["operator"])
        data = table_to_ipc(seal_batch(frame, ["diagnosis_code"], key, "v-moved", 0, {}))
    finally:
        ha.store.close()
    with ingested.client("health-authority") as client, pytest.raises(RemoteError) as moved:
        client.call("operator", CIRCULATION_VISITS.batch, params={"stream": "v-moved", "idx": 1},
                    content=data)
    assert moved.value.http_status == 422 and moved.value.error == "TransportSealInvalid"


def _clear_text_values(ing: Ingested) -> list[str]:
    gt = truth(ing)
    return (gt["national_id"].head(50).tolist() + gt["phone"].dropna().head(50).tolist()
            + gt["name"].head(50).tolist())


_HEX_RUN = re.compile(r"[0-9a-fA-F]{32,}")


def _embedded_outside_hex(db: Path, table: str, column: str) -> list[str]:
    """Values with an embedded id or phone once hex digests/signatures are cut out.

    The scanner reads any 11-digit run as a phone number, and 64- or 128-digit hex
    strings (log signatures, digests) contain such runs by chance about once per
    hundred values; those are not personal data.
    """
    quoted = '"' + table.split(":", 1)[-1].replace('"', '""') + '"'
    with sqlite3.connect(db) as conn:
        values = [v for (v,) in conn.execute(f'SELECT "{column}" FROM {quoted}')]
    texts = []
    for v in values:
        if isinstance(v, bytes):
            try:
                v = v.decode()
            except UnicodeDecodeError:
                continue
        texts.append(_HEX_RUN.sub(" ", str(v)))
    def embeds(text: str) -> bool:
        counts = _match_counts([text], [])
        return bool(counts["embedded:phone"] or counts["embedded:national_id"])

    return [t for t in texts if embeds(t)]


@pytest.mark.parametrize("node", ["operator", "health-authority"])
def test_store_holds_no_identifier_or_top_grade_field_in_the_clear(ingested, node):
    db = ingested.db(node)
    report = scan_path(db, full=True)
    assert report.tables, "the scan must see the store's tables"
    assert report.flagged() == []
    embedded = [(t.table, c.name) for t in report.tables for c in t.columns if c.embedded]
    assert [e for e in embedded if _embedded_outside_hex(db, *e)] == []
    raw = b"".join(p.read_bytes() for p in db.parent.glob("node.db*"))
    for value in _clear_text_values(ingested):
        assert value.encode() not in raw
    if node == "operator":
        with sqlite3.connect(db) as conn:
            kinds = conn.execute(
                f"SELECT DISTINCT typeof(diagnosis_code) FROM {VISITS_TABLE}").fetchall()
        assert kinds == [("blob",)]


def test_tampered_ciphertext_at_the_operator_fails_to_open(ingested):
    db = ingested.db("operator")
    with sqlite3.connect(db) as conn:
        ref, cell = conn.execute(
            f"SELECT visit_ref, diagnosis_code FROM {VISITS_TABLE} LIMIT 1").fetchone()
        flipped = bytearray(cell)
        flipped[-1] ^= 0x01
        conn.execute(f"UPDATE {VISITS_TABLE} SET diagnosis_code = ? WHERE visit_ref = ?",
                     (bytes(flipped), ref))
    try:
        with ingested.client("operator") as client, pytest.raises(RemoteError) as refused:
            client.call("operator", CIRCULATION_SUMMARY)
        assert refused.value.http_status == 422
        assert refused.value.error == "CiphertextInvalid"
    finally:
        with sqlite3.connect(db) as conn:
            conn.execute(f"UPDATE {VISITS_TABLE} SET diagnosis_code = ? WHERE visit_ref = ?",
                         (cell, ref))
    with ingested.client("operator") as client:
        assert client.call("operator", CIRCULATION_SUMMARY).rows


def test_forbidden_flows_are_refused_and_logged(ingested):
    evil = CIRCULATION_VISITS.batch.url(stream="v-evil", idx=0)
    with ingested.client("hospital-1") as client:
        with pytest.raises(RemoteError) as refused:
            client.request("operator", "PUT", evil, kind=Kind.INGEST, content=b"x",
                           check_flow=False)
        with pytest.raises(RemoteError) as admin:
            client.request("health-authority", "POST", PUBLISH.path, kind=Kind.EXPORT,
                           json={"batch_rows": 100})
    assert refused.value.http_status == 403 and refused.value.error == "FlowNotAllowed"
    assert admin.value.http_status == 403 and admin.value.error == "FlowNotAllowed"
    with ingested.client("insurer-a") as client, pytest.raises(RemoteError) as direct:
        client.request("health-authority", "POST", LEVEL1_STEP.path, kind=Kind.OPRF,
                       check_flow=False, json={"points": ["00" * 32]})
    assert direct.value.http_status == 403
    with sqlite3.connect(ingested.db("operator")) as conn:
        rows = conn.execute("SELECT caller, route, error FROM refusals").fetchall()
    assert ("hospital-1", evil, "FlowNotAllowed") in rows


def test_governance_events_are_in_the_log(ingested):
    with sqlite3.connect(ingested.db("operator")) as conn:
        kinds = conn.execute(
            "SELECT kind, actor, COUNT(*) FROM ledger_entries GROUP BY kind, actor").fetchall()
    counted = {(k, a): n for k, a, n in kinds}
    assert counted[("data_registered", "health-authority")] >= 3 + 1  # 3 exports, 1 publication
    assert counted[("data_registered", "operator")] >= 1


def test_each_export_is_registered_and_signed_by_its_hospital(ingested):
    """The log holds one data asset registration per export, signed by the hospital itself
    (the log checks every entry against its actor's certified key), stating the owner,
    grade, rows, digest and lineage the authority governed."""
    ctx = open_node(ingested.fed.state, ingested.fed.topology, "operator")
    entries = [decode_leaf(leaf) for leaf in operator_log(ctx).log.leaves()]
    keys = ctx.signing_public_keys()
    for hospital, result in ingested.exports.items():
        governed = result.governed
        registration = entries[governed.registration_index].entry
        assert registration.event.kind == ASSET_REGISTERED
        assert registration.event.actor == hospital and registration.signature_valid(
            keys[hospital])
        payload = registration.event.payload
        assert payload["owner"] == hospital and payload["rows"] == result.rows == governed.rows
        assert payload["stream"] == result.stream and payload["grade"] == "L4"
        assert payload["source_sha256"].startswith(result.stream.removeprefix("x-"))
        raw = read_export(ingested.data / "raw" / next(
            p.name for p in (ingested.data / "raw").iterdir() if p.stem == hospital))
        assert payload["digest"] == export_digest(raw)


def test_the_operator_holds_no_visits_their_hospital_did_not_register(ingested):
    """The operator registers a publication only when each hospital's visits in it are
    covered by that hospital's own signed registrations: visits of a hospital that
    registered nothing, more visits than it registered, or a registration the authority
    made out as itself in a hospital's name cover nothing."""
    state, topology = ingested.fed.state, ingested.fed.topology
    operator = open_node(state, topology, "operator")
    held = {h: r.rows for h, r in ingested.exports.items()}
    assert unregistered_holdings(operator, held) == []
    assert unregistered_holdings(operator, {**held, "hospital-9": 1}) == ["hospital-9"]
    assert unregistered_holdings(operator, {"hospital-2": 10**6}) == ["hospital-2"]
    ha = open_node(state, topology, "health-authority")
    append_entry(ha, ASSET_REGISTERED, {"dataset": "hospital_export", "owner": "hospital-9",
                                        "rows": 5, "digest": "ef" * 32})
    assert unregistered_holdings(operator, {"hospital-9": 1}) == ["hospital-9"]


def _stage(ing: Ingested, hospital: str, table: pa.Table, stream: str) -> None:
    with ing.client(hospital) as client:
        send_batches(client, "health-authority", EXPORT_BATCHES, stream, table, batch_rows=50)


def _complete(ing: Ingested, sender: str, stream: str, rows: int, registration) -> RemoteError:
    with ing.client(sender) as client, pytest.raises(RemoteError) as refused:
        client.call("health-authority", COMPLETE_EXPORT,
                    ExportComplete(batches=-(-rows // 50), rows=rows, registration=registration),
                    params={"stream": stream})
    return refused.value


def _governed_state(ing: Ingested) -> tuple:
    with sqlite3.connect(ing.db("health-authority")) as conn:
        return (conn.execute("SELECT COUNT(*) FROM ha_exports").fetchone(),
                conn.execute("SELECT COUNT(*) FROM ha_visits").fetchone())


def test_an_export_without_its_hospitals_signed_registration_is_refused(ingested):
    """Attacks on the data asset registration, each refused with a typed error and logged
    (`export_refused`), governing nothing:

    - the health authority, or the operator, makes out a registration in hospital-1's
      name with its own key: the log refuses the entry, and the authority's check too;
    - hospital-1 sends its rows under a registration hospital-2 signed;
    - a registration whose signature is not the hospital's (zeroed);
    - a registration whose digest or row count is not that of the rows that arrived
      (rows altered, or one row dropped, after signing)."""
    ing = ingested
    raw_file = next(p for p in (ing.data / "raw").iterdir() if p.stem == "hospital-1")
    table = read_export(raw_file).slice(0, 120)
    stream = "x-" + "ab" * 16
    _stage(ing, "hospital-1", table, stream)
    state, topology = ing.fed.state, ing.fed.topology
    hospital = open_node(state, topology, "hospital-1")
    honest = sign_registration(hospital, stream, table, raw_file, "cd" * 32, "L4")

    # Forged in hospital-1's name by the authority and by the operator, with their keys.
    for forger in ("health-authority", "operator"):
        forged = sign_event(honest.event, load_signing_key(state, forger))
        ctx = open_node(state, topology, forger)
        with pytest.raises((EntrySignatureInvalid, RemoteError)) as logged:
            append_signed(ctx, forged)
        if isinstance(logged.value, RemoteError):
            assert logged.value.error == "EntrySignatureInvalid"
        assert _complete(ing, "hospital-1", stream, 120, forged).error == (
            "ExportRegistrationInvalid")
    other = sign_registration(open_node(state, topology, "hospital-2"), stream, table,
                              raw_file, "cd" * 32, "L4")
    assert _complete(ing, "hospital-1", stream, 120, other).error == "ExportRegistrationInvalid"
    zeroed = honest.model_copy(update={"signature": "0" * 128})
    assert _complete(ing, "hospital-1", stream, 120, zeroed).error == "ExportRegistrationInvalid"
    altered = table.set_column(0, table.column_names[0], pa.array(
        ["tampered"] + [str(v) for v in table.column(0).to_pylist()[1:]]))
    for signed_over in (altered, table.slice(0, 119)):
        mismatched = sign_registration(hospital, stream, signed_over, raw_file, "cd" * 32, "L4")
        refused = _complete(ing, "hospital-1", stream, 120, mismatched)
        assert refused.error == "ExportRegistrationMismatch" and refused.http_status == 409
    before = _governed_state(ing)
    with ing.client("hospital-1") as client, pytest.raises(RemoteError) as unsigned:
        client.send("health-authority", COMPLETE_EXPORT, params={"stream": stream},
                    json={"batches": 3, "rows": 120})
    assert unsigned.value.http_status == 422
    assert _governed_state(ing) == before
    with sqlite3.connect(ing.db("operator")) as conn:
        refusals = conn.execute(
            "SELECT COUNT(*) FROM ledger_entries WHERE kind = 'export_refused'").fetchone()[0]
        forged_in_log = conn.execute(
            "SELECT COUNT(*) FROM ledger_entries WHERE kind = ? AND actor = 'hospital-1' AND"
            " request_id = ?", (ASSET_REGISTERED, honest.event.request_id)).fetchone()[0]
    assert refusals == 6 and forged_in_log == 0
    # The honest registration of the same rows governs them.
    with ing.client("hospital-1") as client:
        governed = client.call("health-authority", COMPLETE_EXPORT, ExportComplete(
            batches=3, rows=120, registration=honest), params={"stream": stream})
    assert governed.rows == 120 and governed.registration_index > 0


@pytest.mark.slow
def test_cli_ingest_runs_the_whole_chain_again_idempotently(ingested):
    gt = truth(ingested)
    out = ingested.cli("govern", "ingest", "--data", str(ingested.data), "--batch-rows", "100")
    assert f"published {len(gt):,} visits (0/" in out
    with ingested.client("operator") as client:
        held = client.call("operator", CIRCULATION_SUMMARY)
        domains = client.call("operator", LIST_DOMAINS)
    assert held.rows == len(gt)
    # one consent key per person and insurer
    assert held.persons == sum(len(json.loads(line)["public_keys"]) for line in
                               (ingested.data / "consumer_keys.jsonl").open())
    assert {d.data_user for d in domains} == {"insurer-a", "insurer-b"}
    assert all(d.tokens == len(gt) for d in domains)
