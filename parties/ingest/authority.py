"""The health authority: governs hospital exports and publishes them into circulation.

1. Hospitals send their raw exports in batches (`EXPORT_BATCHES`, kind `export`).
   Each batch is staged sealed whole (AES-256-GCM under the staging table's
   data key), so not even the staging holds a raw value in the clear.
2. When an export is complete, and its hospital-signed registration states exactly
   the rows that arrived (`parties.ingest.registration`; else it is refused and
   `export_refused` logged), the authority relays the registration to the log and
   governs the export: asset scan,
   classification and grading (policy file), standardization to the common
   model (overrides file), level-1 tokens P1 = k1·H(national id), an opaque
   `visit_ref` = HMAC(visit id), and encryption at rest of every field graded
   `SEAL_FROM_LEVEL` or above (the top grade always) under the `ha_visits` data
   key wrapped by the node's KEK. The staged raw batches are then dropped.
3. `publish` aligns patients across hospitals and sends the operator only
   tokens, refs and the fields the claim check needs, top grade sealed to the
   operator (see `parties.ingest.circulation`), then has it register the data.

k1 itself, and the level-1 OPRF step that applies it, belong to shared domains
(`parties.domains.keys`, `parties.domains.service`).
"""

import datetime as dt
import hashlib
import hmac
import json
import sqlite3
from collections.abc import Callable
from typing import Any

import pandas as pd
import pyarrow as pa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastapi import APIRouter

from governance.at_rest import Keyring, open_value, seal_value
from governance.classify import classify_table, load_policy
from governance.ledger import SignedEntry
from governance.scan import scan_frame
from governance.standardize import (
    COMMON_FIELDS,
    align_patients,
    apply_mapping,
    infer_mapping,
    load_overrides,
)
from mpc import xid
from parties.domains.keys import level1_key, level1_lock, xid_pool
from parties.ingest.api import (
    CIRCULATION_PERSONS,
    CIRCULATION_VISITS,
    COMPLETE_EXPORT,
    CONSUMER_KEYS,
    DEFAULT_BATCH_ROWS,
    EXPORT_BATCHES,
    EXPORT_REFUSED,
    GOVERNANCE_SUMMARY,
    INSURER_NAME,
    LONG_CALL_S,
    PUBLISH,
    REGISTER,
    AuthorityError,
    ExportComplete,
    ExportIncomplete,
    ExportRegistrationInvalid,
    ExportRegistrationMismatch,
    GovernanceSummary,
    GovernedExport,
    HospitalDigest,
    NothingToPublish,
    Publication,
    PublishRequest,
    Registration,
)
from parties.ingest.circulation import (
    CIRCULATION_FIELDS,
    circulation_digest,
    persons_digest,
    seal_batch,
    send_sealed_batches,
)
from parties.ingest.governed import DATA_FIELDS, VISITS_TABLE, governed_visits
from parties.ingest.registration import check_registration
from parties.ledger.client import append_entry, append_signed
from parties.runtime import batches
from parties.runtime.access import Caller
from parties.runtime.batches import (
    BatchReceiver,
    StreamName,
    ipc_to_table,
    mount_batch_stream,
    send_batches,
    table_to_ipc,
)
from parties.runtime.client import NodeClient
from parties.runtime.context import NodeContext
from parties.runtime.mount import mount
from parties.runtime.sealing import sealing_public_key
from parties.runtime.service import Service
from parties.runtime.topology import Role

VISIT_REF_KEY_TABLE = "hmac:visit_ref"  # a keyring entry used as the visit_ref HMAC key
STAGING_TABLE = "ha_staged_batches"
SEAL_FROM_LEVEL = 3  # seal fields graded L3 and above; the top grade is always sealed

COMPONENT = "health_authority"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE ha_staged_batches (
        stream TEXT NOT NULL, idx INTEGER NOT NULL, hospital_id TEXT NOT NULL,
        rows INTEGER NOT NULL, sealed BLOB NOT NULL, PRIMARY KEY (stream, idx)
    );
    CREATE TABLE ha_exports (
        stream TEXT PRIMARY KEY, hospital_id TEXT NOT NULL, rows INTEGER NOT NULL,
        persons INTEGER NOT NULL, digest TEXT NOT NULL, mapping TEXT NOT NULL,
        scan TEXT NOT NULL, grades TEXT NOT NULL, sealed_fields TEXT NOT NULL,
        governed_at TEXT NOT NULL DEFAULT (datetime('now'))
    );
    CREATE TABLE ha_visits (
        visit_id TEXT PRIMARY KEY, hospital_id TEXT NOT NULL, visit_ref BLOB NOT NULL UNIQUE,
        p1 BLOB NOT NULL, national_id ANY, name ANY, phone ANY, address ANY, birth_date ANY,
        sex ANY, admission_date ANY, discharge_date ANY, diagnosis_code ANY, total_fen ANY,
        covered_fen ANY, self_pay_fen ANY, export_stream TEXT NOT NULL
    );
    CREATE TABLE ha_consumer_keys (p1 BLOB PRIMARY KEY, public_key BLOB NOT NULL)
    """,
    # One consent key per person and insurer, never the same key for two insurers. A key
    # registered before is kept bound to no insurer (''): it opens no insurer's check.
    """
    CREATE TABLE ha_consumer_keys_by_insurer (
        p1 BLOB NOT NULL, insurer TEXT NOT NULL, public_key BLOB NOT NULL,
        PRIMARY KEY (p1, insurer), UNIQUE (p1, public_key)
    );
    INSERT INTO ha_consumer_keys_by_insurer (p1, insurer, public_key)
        SELECT p1, '', public_key FROM ha_consumer_keys;
    DROP TABLE ha_consumer_keys;
    ALTER TABLE ha_consumer_keys_by_insurer RENAME TO ha_consumer_keys
    """,
    # A consent key names one person: the key is the consent's only binding to the person
    # (`governance.consent`). A key held by two persons names neither: both rows go (their
    # consents are refused until the consumers register keys of their own).
    """
    DELETE FROM ha_consumer_keys WHERE public_key IN (
        SELECT public_key FROM ha_consumer_keys GROUP BY public_key
        HAVING COUNT(DISTINCT p1) > 1);
    CREATE UNIQUE INDEX ha_consumer_keys_one_key_one_row ON ha_consumer_keys (public_key)
    """,
    # The log index of the hospital's signed registration of each export (-1: governed
    # before hospitals signed their exports, or relayed by an attempt that then failed).
    """
    ALTER TABLE ha_exports ADD COLUMN registration_index INTEGER NOT NULL DEFAULT -1
    """,
)
CONSUMER_KEY_COLUMNS = ["insurer", "national_id", "public_key"]  # sorted


# --- visit references ----------------------------------------------------------------------


def _visit_ref_key(ctx: NodeContext) -> bytes:
    keyring = ctx.secrets.data_key_for(VISIT_REF_KEY_TABLE)
    return keyring.data_key(keyring.active_key_id(VISIT_REF_KEY_TABLE))


def visit_refs(ctx: NodeContext, visit_ids: list[str]) -> list[bytes]:
    """Opaque, stable per-visit references: HMAC-SHA256 of the visit id under an HA key."""
    key = _visit_ref_key(ctx)
    return [hmac.new(key, v.encode(), hashlib.sha256).digest() for v in visit_ids]


# --- digests -----------------------------------------------------------------------------


def visits_digest(frame: pd.DataFrame) -> str:
    """SHA-256 over common-model rows ordered by visit id (dates ISO, amounts integer fen)."""
    def text(value: Any) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return ""
        if isinstance(value, dt.date):
            return value.isoformat()
        return str(value.item() if hasattr(value, "item") else value)

    if frame.empty:
        return hashlib.sha256(b"").hexdigest()
    # visit_id leads each line and is unique, so sorting the lines orders them by visit id.
    columns = [[text(v) for v in frame[f].tolist()] for f in COMMON_FIELDS]
    lines = sorted("\x1f".join(row) for row in zip(*columns, strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# --- sealing helpers ------------------------------------------------------------------------


def _seal_column(keyring: Keyring, column: str, values: list, row_keys: list[str]) -> list:
    key_id = keyring.active_key_id(VISITS_TABLE)
    cipher = (bytes.fromhex(key_id), AESGCM(keyring.data_key(key_id)))
    return [seal_value(v, keyring, VISITS_TABLE, column, k, cipher)
            for v, k in zip(values, row_keys, strict=True)]


def _plain(value: Any) -> Any:
    if isinstance(value, dt.date):
        return value.isoformat()
    if hasattr(value, "item"):
        return value.item()
    return value


# --- governing an export ------------------------------------------------------------------


def _staged_table(ctx: NodeContext, stream: str, batches: int) -> tuple[str, pa.Table]:
    keyring = ctx.secrets.data_key_for(STAGING_TABLE)
    with ctx.store.lock:
        rows = ctx.store.conn.execute(
            "SELECT idx, hospital_id, sealed FROM ha_staged_batches WHERE stream = ? ORDER BY idx",
            (stream,),
        ).fetchall()
    have = [r[0] for r in rows]
    if have != list(range(batches)):
        missing = sorted(set(range(batches)) - set(have))
        raise ExportIncomplete(f"export {stream} lacks batches {missing[:20]}")
    tables = [ipc_to_table(open_value(bytes(s), keyring, STAGING_TABLE, "batch", f"{stream}/{i}"))
              for i, _h, s in rows]
    return rows[0][1], pa.concat_tables(tables, promote_options="permissive")


def govern_export(ctx: NodeContext, stream: str, batches: int,
                  registration: SignedEntry) -> GovernedExport:
    """Check the hospital's registration of a complete export, relay it to the log, then
    scan, classify, standardize, tokenize and seal the export; drop its staging."""
    with level1_lock(ctx):
        return _govern_export(ctx, stream, batches, registration)


def _registered(ctx: NodeContext, hospital: str, stream: str, table: pa.Table,
                registration: SignedEntry) -> int:
    """The log index of `hospital`'s registration of `table`, after checking it; a refused
    registration is logged (`EXPORT_REFUSED`) and governs nothing."""
    name = stream.rsplit(":", 1)[-1]  # the hospital's name for it, without the staging prefix
    try:
        check_registration(ctx, registration, hospital, name, table)
    except (ExportRegistrationInvalid, ExportRegistrationMismatch) as exc:
        append_entry(ctx, EXPORT_REFUSED, {"owner": hospital, "stream": name,
                                           "rows": table.num_rows, "reason": type(exc).__name__})
        ctx.log.event("export_refused", hospital=hospital, stream=stream,
                      reason=type(exc).__name__, detail=str(exc))
        raise
    appended = append_signed(ctx, registration)
    # An entry the log already holds (an earlier attempt relayed it) reports no index.
    return appended.first_index if appended.count else -1


def _govern_export(ctx: NodeContext, stream: str, batches: int,
                   registration: SignedEntry) -> GovernedExport:
    with ctx.store.lock:
        done = ctx.store.conn.execute(
            "SELECT stream FROM ha_exports WHERE stream = ?", (stream,)).fetchone()
    if done:
        return exported(ctx, stream)
    hospital, table = _staged_table(ctx, stream, batches)
    registration_index = _registered(ctx, hospital, stream, table, registration)
    raw = table.to_pandas()
    policy = load_policy()
    profile = scan_frame(raw, hospital)
    # The scan's uniform sample profiles the columns for the schema matching too.
    mapping = infer_mapping(raw.head(2000), hospital, load_overrides().for_hospital(hospital),
                            profile=profile)
    raw_grades = {g.column: g.level for g in classify_table(profile, policy, mapping.columns())}
    std = apply_mapping(raw, mapping).to_pandas()
    digest = visits_digest(std)
    common_profile = scan_frame(std.head(2000).astype(object), "common_model")
    grades = {g.column: g.level for g in classify_table(
        common_profile, policy, {f: f for f in COMMON_FIELDS})}
    top = max(int(level[1:]) for level in policy.levels)
    sealed = [f for f in DATA_FIELDS
              if int(grades[f][1:]) >= min(SEAL_FROM_LEVEL, top)]
    ids = std["national_id"].tolist()
    distinct = list(dict.fromkeys(ids))
    p1_of = dict(zip(distinct, xid.tokenize(level1_key(ctx), distinct, pool=xid_pool(ctx)),
                     strict=True))
    visit_ids = std["visit_id"].tolist()
    refs = visit_refs(ctx, visit_ids)
    keyring = ctx.secrets.data_key_for(VISITS_TABLE)
    stored = {}
    for f in DATA_FIELDS:
        values = [_plain(v) for v in std[f].tolist()]
        values = [None if (isinstance(v, float) and v != v) else v for v in values]
        stored[f] = _seal_column(keyring, f, values, visit_ids) if f in sealed else values
    rows = [(visit_ids[i], hospital, refs[i], p1_of[ids[i]],
             *(stored[f][i] for f in DATA_FIELDS), stream) for i in range(len(std))]
    result = GovernedExport(
        stream=stream, hospital_id=hospital, rows=len(std), persons=len(distinct), digest=digest,
        mapped={f: m.column for f, m in mapping.fields.items()},
        flagged={c.name: c.sensitive_type for c in profile.columns if c.sensitive_type},
        raw_grades=raw_grades, grades=grades, sealed_fields=sealed,
        registration_index=registration_index,
    )
    columns = ("visit_id", "hospital_id", "visit_ref", "p1", *DATA_FIELDS, "export_stream")
    with ctx.store.lock, ctx.store.conn as conn:
        conn.executemany(
            f"INSERT OR REPLACE INTO {VISITS_TABLE} ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' * len(columns))})", rows,
        )
        conn.execute("DELETE FROM ha_staged_batches WHERE stream = ?", (stream,))
        conn.execute(
            "INSERT INTO ha_exports (stream, hospital_id, rows, persons, digest, mapping, scan,"
            " grades, sealed_fields, registration_index) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (stream, hospital, result.rows, result.persons, digest,
             json.dumps(result.mapped, ensure_ascii=False), profile.model_dump_json(),
             json.dumps({"raw": raw_grades, "common": grades}), json.dumps(sealed),
             registration_index),
        )
    append_entry(ctx, "data_registered", {
        "dataset": "hospital_export", "owner": hospital, "stream": stream, "rows": result.rows,
        "persons": result.persons, "digest": digest, "sealed_fields": sealed,
        "flagged_columns": len(result.flagged), "stage": "governed",
        "registration_index": registration_index,
    })
    ctx.log.event("export_governed", hospital=hospital, stream=stream, rows=result.rows,
                  persons=result.persons)
    return result


def exported(ctx: NodeContext, stream: str) -> GovernedExport:
    with ctx.store.lock:
        row = ctx.store.conn.execute(
            "SELECT hospital_id, rows, persons, digest, mapping, scan, grades, sealed_fields,"
            " registration_index FROM ha_exports WHERE stream = ?", (stream,)).fetchone()
    if row is None:
        raise AuthorityError(f"no governed export {stream}")
    hospital, rows, persons, digest, mapping, scan, grades, sealed, registration_index = row
    profile = json.loads(scan)
    both = json.loads(grades)
    return GovernedExport(
        stream=stream, hospital_id=hospital, rows=rows, persons=persons, digest=digest,
        mapped=json.loads(mapping),
        flagged={c["name"]: c["sensitive_type"] for c in profile["columns"]
                 if c["sensitive_type"]},
        raw_grades=both["raw"], grades=both["common"], sealed_fields=json.loads(sealed),
        registration_index=registration_index,
    )


def governance_summary(ctx: NodeContext) -> GovernanceSummary:
    """Per hospital: rows, persons and the digest of the stored governed copy (reopened)."""
    frame = governed_visits(ctx)
    out = {}
    for hospital, part in frame.groupby("hospital_id"):
        out[str(hospital)] = HospitalDigest(rows=len(part), persons=part["p1"].nunique(),
                                            digest=visits_digest(part[list(COMMON_FIELDS)]))
    with ctx.store.lock:
        keys = ctx.store.conn.execute("SELECT COUNT(*) FROM ha_consumer_keys").fetchone()[0]
    return GovernanceSummary(hospitals=out, rows=len(frame), consumer_keys=keys)


# --- consumer public keys ------------------------------------------------------------------


def _apply_consumer_keys(ctx: NodeContext) -> Callable[[sqlite3.Connection, pa.Table], int]:
    """Consumers' consent public keys, one per (person, insurer), as their apps registered
    them: kept by p1, refused whole if a key is malformed or serves two insurers."""
    def apply(conn: sqlite3.Connection, table: pa.Table) -> int:
        if sorted(table.column_names) != CONSUMER_KEY_COLUMNS:
            raise AuthorityError("consumer key batches have exactly national_id, insurer, "
                                 "public_key (one consent key per person and insurer)")
        ids = [str(v) for v in table["national_id"].to_pylist()]
        insurers = [str(v) for v in table["insurer"].to_pylist()]
        try:
            keys = [bytes.fromhex(str(k)) for k in table["public_key"].to_pylist()]
        except ValueError:
            raise AuthorityError("public keys are 32-byte Ed25519 keys (hex)") from None
        if any(len(k) != 32 for k in keys):
            raise AuthorityError("public keys are 32-byte Ed25519 keys (hex)")
        if any(not INSURER_NAME.fullmatch(i) for i in insurers):
            raise AuthorityError("insurer: a node name (lowercase letters, digits, . _ -)")
        with level1_lock(ctx):
            p1s = xid.tokenize(level1_key(ctx), ids, pool=xid_pool(ctx))
        # Only the token is kept: the authority needs no second copy of the id.
        try:
            conn.executemany(
                "INSERT INTO ha_consumer_keys (p1, insurer, public_key) VALUES (?, ?, ?) "
                "ON CONFLICT (p1, insurer) DO UPDATE SET public_key = excluded.public_key",
                list(zip(p1s, insurers, keys, strict=True)),
            )
        except sqlite3.IntegrityError:  # UNIQUE (public_key): one person, one insurer
            raise AuthorityError("a consent key serves one person and one insurer: this key "
                                 "is already registered for another") from None
        return len(ids)

    return apply


# --- publishing to the operator --------------------------------------------------------------


def operator_name(ctx: NodeContext) -> str:
    return ctx.topology.node_of(Role.OPERATOR)


def publish(
    ctx: NodeContext, *, batch_rows: int = DEFAULT_BATCH_ROWS,
    on_batch: Callable[[int, int], None] | None = None,
) -> Publication:
    """Send the governed visits (tokenized, graded, top grade sealed) and keys to the operator."""
    with level1_lock(ctx):
        return _publish(ctx, batch_rows=batch_rows, on_batch=on_batch)


def _publish(
    ctx: NodeContext, *, batch_rows: int, on_batch: Callable[[int, int], None] | None
) -> Publication:
    frame = governed_visits(ctx)
    if frame.empty:
        raise NothingToPublish("no governed visits yet: export from the hospitals first")
    # Alignment runs in memory at the authority; only its counts leave this function.
    aligned = align_patients(pa.Table.from_pandas(
        frame[["visit_id", "hospital_id", "national_id", "name", "phone", "sex", "birth_date",
               "address"]], preserve_index=False))
    with ctx.store.lock:
        levels = [json.loads(r[0])["common"] for r in ctx.store.conn.execute(
            "SELECT grades FROM ha_exports").fetchall()]
        persons = ctx.store.conn.execute(
            "SELECT p1, insurer, public_key FROM ha_consumer_keys ORDER BY p1, insurer"
        ).fetchall()
    grades = {f: max((lv[f] for lv in levels if f in lv), key=lambda x: int(x[1:]))
              for f in CIRCULATION_FIELDS[2:]}
    top = max(int(g[1:]) for lv in levels for g in lv.values())
    sealed = [f for f, g in grades.items() if int(g[1:]) >= top]
    view = frame[list(CIRCULATION_FIELDS)].sort_values(
        "visit_ref", key=lambda s: s.map(bytes.hex)).reset_index(drop=True)
    digest = circulation_digest(view)
    stream = f"v-{digest[:32]}"
    operator = operator_name(ctx)
    operator_key = sealing_public_key(ctx.signing_public_keys()[operator])
    p1s = [bytes(p) for p, _, _ in persons]
    insurers = [str(i) for _, i, _ in persons]
    keys = [bytes(k) for _, _, k in persons]
    pdigest = persons_digest(p1s, insurers, keys)
    with NodeClient(ctx.state, ctx.topology, ctx.name, log=ctx.log, timeout=LONG_CALL_S) as client:
        sent = send_sealed_batches(
            client, operator, CIRCULATION_VISITS, stream, view,
            lambda chunk, idx: seal_batch(chunk, sealed, operator_key, stream, idx, grades),
            batch_rows=batch_rows, on_batch=on_batch,
        )
        if p1s:
            send_batches(
                client, operator, CIRCULATION_PERSONS, f"p-{pdigest[:32]}",
                pa.table({"p1": pa.array(p1s, pa.binary(32)),
                          "insurer": pa.array(insurers, pa.string()),
                          "public_key": pa.array(keys, pa.binary(32))}),
                batch_rows=20_000,
            )
        registered = client.call(operator, REGISTER, Registration(
            stream=stream, rows=len(view), digest=digest, persons=len(p1s),
            persons_digest=pdigest, grades=grades,
        ))
    alignment = {
        "persons": aligned.persons,
        "persons_in_several_hospitals": aligned.persons_in_several_hospitals,
        "attribute_conflicts": len(aligned.conflicts),
        "id_inconsistent_visits": len(aligned.id_inconsistent),
    }
    append_entry(ctx, "data_registered", {
        "dataset": "claim_check.visits", "owner": ctx.name, "stream": stream, "rows": len(view),
        "digest": digest, "persons": len(p1s), "persons_digest": pdigest,
        "recipient": operator, "stage": "published", "sealed_fields": sealed,
    })
    ctx.log.event("published", stream=stream, rows=len(view), batches=sent.batches,
                  sent=sent.sent, skipped=sent.skipped, rows_sent=sent.rows_sent)
    return Publication(
        stream=stream, rows=len(view), digest=digest, persons=len(p1s), persons_digest=pdigest,
        batches=sent.batches, sent=sent.sent, skipped=sent.skipped,
        sealed_fields=sealed, alignment=alignment, registered_rows=registered.rows,
    )


# --- routes -----------------------------------------------------------------------------------


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()
    receiver = BatchReceiver(ctx.store)
    staging = ctx.secrets.data_key_for(STAGING_TABLE)

    def internal(caller: Caller, stream: str) -> str:
        # Streams are per hospital: one hospital can never add to another's export.
        return f"export:{caller.name}:{stream}"

    def stage(caller: Caller, stream: str, idx: int) -> batches.Apply:
        key = internal(caller, stream)

        def apply(conn: sqlite3.Connection, table: pa.Table) -> int:
            sealed = seal_value(table_to_ipc(table), staging, STAGING_TABLE, "batch",
                                f"{key}/{idx}")
            conn.execute(
                "INSERT OR REPLACE INTO ha_staged_batches (stream, idx, hospital_id, rows, sealed)"
                " VALUES (?, ?, ?, ?, ?)", (key, idx, caller.name, table.num_rows, sealed))
            return table.num_rows

        return apply

    mount_batch_stream(router, EXPORT_BATCHES, receiver, internal, stage,
                       "a hospital's raw export (staged sealed)")

    @mount(router, COMPLETE_EXPORT)
    def complete_export(stream: StreamName, body: ExportComplete, caller: Caller
                        ) -> GovernedExport:
        """All batches sent: govern the export (idempotent)."""
        key = internal(caller, stream)
        with ctx.store.lock:
            staged = ctx.store.conn.execute(
                "SELECT COALESCE(SUM(rows), 0) FROM ha_staged_batches WHERE stream = ?",
                (key,)).fetchone()[0]
            governed = ctx.store.conn.execute(
                "SELECT 1 FROM ha_exports WHERE stream = ?", (key,)).fetchone()
        if not governed and staged != body.rows:
            raise ExportIncomplete(f"export {stream}: {staged} rows staged, {body.rows} announced")
        return govern_export(ctx, key, body.batches, body.registration)

    @mount(router, GOVERNANCE_SUMMARY)
    def get_summary(caller: Caller) -> GovernanceSummary:
        """Rows, persons and digests of the governed copy, per hospital."""
        return governance_summary(ctx)

    mount_batch_stream(router, CONSUMER_KEYS, receiver,
                       lambda caller, stream: f"keys:{stream}",
                       lambda caller, stream, idx: _apply_consumer_keys(ctx),
                       "consumers' consent public keys, one per insurer (national_id, "
                       "insurer, public_key hex; only (p1, insurer) -> key is kept)")

    @mount(router, PUBLISH)
    def post_publish(body: PublishRequest, caller: Caller) -> Publication:
        """Publish the governed visits into circulation at the operator (resumable)."""
        return publish(ctx, batch_rows=body.batch_rows)

    return [router]


HEALTH_AUTHORITY_SERVICE = Service(
    name="health-authority",
    roles=(Role.HEALTH_AUTHORITY,),
    routers=_routes,
    components=((COMPONENT, MIGRATIONS), (batches.COMPONENT, batches.MIGRATIONS)),
)
