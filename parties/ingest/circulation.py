"""Entry into circulation: what the health authority publishes and the operator keeps.

The health authority publishes per visit an opaque `visit_ref` (HMAC of the
visit id under a key of its own), the person's level-1 token `p1 = k1·H(id)`,
the hospital and the fields the claim check needs. Fields of the top grade
travel sealed with AES-256-GCM under a per-batch data key, itself sealed
(libsodium SealedBox) to the operator's X25519 key, which is derived from the
operator's CA-certified Ed25519 signing key. The operator opens them and seals
them again under its own keyring before they touch its store. It registers a
holding only when each hospital's visits in it are covered by that hospital's own
signed data asset registrations in the log (`unregistered_holdings`).

Each person's consent public keys, one per insurer, travel in a separate stream keyed
by (p1, insurer) and land in `circ_persons`, never in a per-shared-domain table. A
person's key for one insurer is unrelated to their key for another, so the consents
the serving node registers for two insurers carry no common key to link them by.
Arriving visits get their token in every live shared domain in the same transaction
(`parties.domains.registry.index_visits`).

Operator tables:

    circ_visits(visit_ref BLOB PK, p1 BLOB, hospital_id, admission_date, discharge_date,
                diagnosis_code (sealed BLOB), total_fen, covered_fen, self_pay_fen, stream)
    circ_persons(p1 BLOB, insurer TEXT, public_key BLOB, stream; PK (p1, insurer))
    circ_registrations(stream PK, owner, rows, digest, persons, persons_digest, grades, at)
"""

import base64
import datetime as dt
import hashlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import nacl.exceptions
import nacl.public
import pandas as pd
import pyarrow as pa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastapi import APIRouter

from governance.at_rest import seal_value
from parties.domains.registry import index_visits
from parties.ingest.api import (
    ASSET_REGISTERED,
    CIRCULATION_PERSONS,
    CIRCULATION_SUMMARY,
    CIRCULATION_VISITS,
    INSURER_NAME,
    REGISTER,
    CirculationSummary,
    Registration,
    RegistrationMismatch,
    TransportSealInvalid,
)
from parties.ingest.circulated import (
    CIRCULATION_FIELDS,
    DATE_FIELDS,
    INT_FIELDS,
    PERSONS_TABLE,
    VISITS_TABLE,
    read_visits,
)
from parties.ledger.client import append_entry
from parties.ledger.operator_log import operator_log
from parties.runtime import batches
from parties.runtime.access import Caller
from parties.runtime.batch_routes import BatchStream
from parties.runtime.batches import (
    BatchReceiver,
    TransferSummary,
    mount_batch_stream,
    send_built_batches,
)
from parties.runtime.client import NodeClient
from parties.runtime.context import NodeContext
from parties.runtime.mount import mount
from parties.runtime.sealing import open_bytes, seal_bytes, sealing_private_key
from parties.runtime.service import Service
from parties.runtime.topology import Role

META_SEALED_KEY = b"cogov.sealed_key"
META_SEALED_COLUMNS = b"cogov.sealed_columns"
META_GRADES = b"cogov.grades"

COMPONENT = "circulation"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE circ_visits (
        visit_ref BLOB PRIMARY KEY, p1 BLOB NOT NULL, hospital_id TEXT NOT NULL,
        admission_date TEXT, discharge_date TEXT, diagnosis_code ANY,
        total_fen ANY, covered_fen ANY, self_pay_fen ANY, stream TEXT NOT NULL
    );
    CREATE INDEX circ_visits_p1 ON circ_visits (p1);
    CREATE TABLE circ_persons (p1 BLOB PRIMARY KEY, public_key BLOB NOT NULL, stream TEXT);
    CREATE TABLE circ_registrations (
        stream TEXT PRIMARY KEY, owner TEXT NOT NULL, rows INTEGER NOT NULL,
        digest TEXT NOT NULL, persons INTEGER NOT NULL, persons_digest TEXT NOT NULL,
        grades TEXT NOT NULL, registered_at TEXT NOT NULL DEFAULT (datetime('now'))
    )
    """,
    # One consent key per person and insurer; a key delivered before is bound to no
    # insurer ('') and so opens no insurer's check.
    """
    CREATE TABLE circ_persons_by_insurer (
        p1 BLOB NOT NULL, insurer TEXT NOT NULL, public_key BLOB NOT NULL, stream TEXT,
        PRIMARY KEY (p1, insurer)
    );
    INSERT INTO circ_persons_by_insurer (p1, insurer, public_key, stream)
        SELECT p1, '', public_key, stream FROM circ_persons;
    DROP TABLE circ_persons;
    ALTER TABLE circ_persons_by_insurer RENAME TO circ_persons;
    CREATE INDEX circ_persons_insurer ON circ_persons (insurer)
    """,
)


def field_aad(stream: str, idx: int, column: str, visit_ref: bytes) -> bytes:
    """Associated data binding a sealed field to its publication, batch, column and visit."""
    parts = [b"cogov/circulation/v1", stream.encode(), str(idx).encode(), column.encode(),
             visit_ref]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _encode_field(value: Any) -> bytes:
    if isinstance(value, dt.date):
        value = value.isoformat()
    return json.dumps(value).encode()


def seal_batch(
    frame: pd.DataFrame, sealed_columns: Sequence[str], operator_key: nacl.public.PublicKey,
    stream: str, idx: int, grades: dict[str, str],
) -> pa.Table:
    """One publication batch: top-grade columns sealed under a fresh key sealed to the operator."""
    key = AESGCM.generate_key(bit_length=256)
    aead = AESGCM(key)
    refs = frame["visit_ref"].tolist()
    columns: dict[str, pa.Array] = {}
    for name in CIRCULATION_FIELDS:
        values = frame[name].tolist()
        if name in sealed_columns:
            sealed = []
            for value, ref in zip(values, refs, strict=True):
                nonce = os.urandom(12)
                aad = field_aad(stream, idx, name, ref)
                sealed.append(nonce + aead.encrypt(nonce, _encode_field(value), aad))
            columns[name] = pa.array(sealed, type=pa.binary())
        else:
            columns[name] = pa.array(values, type=_arrow_type(name))
    metadata = {
        META_SEALED_KEY: base64.b64encode(seal_bytes(operator_key, key)),
        META_SEALED_COLUMNS: json.dumps(list(sealed_columns)).encode(),
        META_GRADES: json.dumps(grades).encode(),
    }
    return pa.table(columns).replace_schema_metadata(metadata)


def _arrow_type(name: str) -> pa.DataType:
    if name in ("visit_ref", "p1"):
        return pa.binary(32)
    if name in DATE_FIELDS:
        return pa.date32()
    if name in INT_FIELDS:
        return pa.int64()
    return pa.string()


def open_batch(
    table: pa.Table, private_key: nacl.public.PrivateKey, stream: str, idx: int
) -> tuple[pd.DataFrame, list[str], dict[str, str]]:
    """The plaintext rows of a publication batch, its sealed columns and the field grades."""
    meta = table.schema.metadata or {}
    missing = [f for f in CIRCULATION_FIELDS if f not in table.column_names]
    if missing or META_SEALED_KEY not in meta:
        raise TransportSealInvalid(f"batch lacks {missing or 'its sealed key'}")
    try:
        key = open_bytes(private_key, base64.b64decode(meta[META_SEALED_KEY]))
        sealed_columns = [str(c) for c in json.loads(meta.get(META_SEALED_COLUMNS, b"[]"))]
        grades = {str(k): str(v) for k, v in json.loads(meta.get(META_GRADES, b"{}")).items()}
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise TransportSealInvalid(f"batch key does not open for this node: {exc}") from None
    aead = AESGCM(key)
    frame = pd.DataFrame({f: table[f].to_pylist() for f in CIRCULATION_FIELDS})
    bad_refs = [r for r in frame["visit_ref"] if not isinstance(r, bytes) or len(r) != 32]
    bad_p1 = [p for p in frame["p1"] if not isinstance(p, bytes) or len(p) != 32]
    if bad_refs or bad_p1:
        raise TransportSealInvalid("visit_ref and p1 must be 32-byte values")
    for name in sealed_columns:
        if name not in CIRCULATION_FIELDS:
            raise TransportSealInvalid(f"unknown sealed column {name!r}")
        opened = []
        for blob, ref in zip(frame[name].tolist(), frame["visit_ref"].tolist(), strict=True):
            try:
                plain = aead.decrypt(blob[:12], blob[12:], field_aad(stream, idx, name, ref))
            except (InvalidTag, TypeError, ValueError):
                raise TransportSealInvalid(
                    f"sealed {name} of a visit in batch {stream}/{idx} fails authentication"
                ) from None
            value = json.loads(plain)
            opened.append(dt.date.fromisoformat(value) if name in DATE_FIELDS else value)
        frame[name] = opened
    return frame, sealed_columns, grades


# --- digests shared by both ends ---------------------------------------------------------


def circulation_digest(frame: pd.DataFrame) -> str:
    """SHA-256 over the plaintext circulation rows, ordered by visit_ref (hex)."""
    if frame.empty:
        return hashlib.sha256(b"").hexdigest()
    columns = [[bytes(v).hex() for v in frame["visit_ref"].tolist()],
               [bytes(v).hex() for v in frame["p1"].tolist()]]
    columns += [[_canonical_text(v) for v in frame[f].tolist()] for f in CIRCULATION_FIELDS[2:]]
    lines = sorted("\x1f".join(row) for row in zip(*columns, strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def persons_digest(p1s: Iterable[bytes], insurers: Iterable[str], keys: Iterable[bytes]) -> str:
    """SHA-256 over the (p1, insurer, consent public key) triples, in sorted order (hex)."""
    lines = sorted(f"{bytes(p).hex()}\x1f{i}\x1f{bytes(k).hex()}"
                   for p, i, k in zip(p1s, insurers, keys, strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _canonical_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.date):
        return value.isoformat()
    if hasattr(value, "item"):
        value = value.item()
    return str(value)


# --- sending publication batches (health authority side) ---------------------------------


def send_sealed_batches(
    client: NodeClient,
    target: str,
    routes: BatchStream,
    stream: str,
    frame: pd.DataFrame,
    build: Callable[[pd.DataFrame, int], pa.Table],
    *,
    batch_rows: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> TransferSummary:
    """Like `batches.send_batches`, but each batch is built (sealed) when it is sent.

    The split is deterministic (rows in a fixed order), so a resumed transfer numbers
    batches the same way and sends only those the receiver lacks.
    """
    return send_built_batches(
        client, target, routes, stream, max(1, -(-len(frame) // batch_rows)),
        lambda idx: build(frame.iloc[idx * batch_rows:(idx + 1) * batch_rows], idx),
        on_batch=on_batch,
    )


# --- the operator's store ------------------------------------------------------------------


def _operator_private_key(ctx: NodeContext) -> nacl.public.PrivateKey:
    return ctx.component(nacl.public.PrivateKey, lambda: sealing_private_key(ctx.signing_key))


def _apply_visits(ctx: NodeContext, stream: str, idx: int) -> Callable[[sqlite3.Connection,
                                                                        pa.Table], int]:
    def apply(conn: sqlite3.Connection, table: pa.Table) -> int:
        frame, sealed_columns, _grades = open_batch(table, _operator_private_key(ctx), stream, idx)
        keyring = ctx.secrets.data_key_for(VISITS_TABLE)
        refs = frame["visit_ref"].tolist()
        stored: dict[str, list[Any]] = {}
        for name in CIRCULATION_FIELDS[2:]:
            values = frame[name].tolist()
            if name in sealed_columns:
                values = [seal_value(v, keyring, VISITS_TABLE, name, r.hex())
                          for v, r in zip(values, refs, strict=True)]
            elif name in DATE_FIELDS:
                values = [v.isoformat() if v is not None else None for v in values]
            stored[name] = values
        rows = [
            (refs[i], frame["p1"].iat[i], *(stored[n][i] for n in CIRCULATION_FIELDS[2:]), stream)
            for i in range(len(frame))
        ]
        updates = ", ".join(f"{c} = excluded.{c}" for c in (*CIRCULATION_FIELDS[1:], "stream"))
        conn.executemany(
            f"INSERT INTO {VISITS_TABLE} ({', '.join(CIRCULATION_FIELDS)}, stream) "
            f"VALUES ({', '.join('?' * (len(CIRCULATION_FIELDS) + 1))}) "
            f"ON CONFLICT(visit_ref) DO UPDATE SET {updates}",
            rows,
        )
        index_visits(ctx, conn, refs, frame["p1"].tolist())
        return len(rows)

    return apply


def _apply_persons(stream: str) -> Callable[[sqlite3.Connection, pa.Table], int]:
    def apply(conn: sqlite3.Connection, table: pa.Table) -> int:
        if table.column_names != ["p1", "insurer", "public_key"]:
            raise TransportSealInvalid(
                "a persons batch has exactly the columns p1, insurer, public_key")
        p1s, keys = table["p1"].to_pylist(), table["public_key"].to_pylist()
        insurers = table["insurer"].to_pylist()
        if any(not isinstance(v, bytes) or len(v) != 32 for v in (*p1s, *keys)):
            raise TransportSealInvalid("p1 and public_key must be 32-byte values")
        if any(not isinstance(i, str) or (i and not INSURER_NAME.fullmatch(i))
               for i in insurers):
            raise TransportSealInvalid("insurer: a node name, or '' for a key of no insurer")
        conn.executemany(
            f"INSERT INTO {PERSONS_TABLE} (p1, insurer, public_key, stream) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(p1, insurer) DO UPDATE SET public_key = excluded.public_key, "
            "stream = excluded.stream",
            [(p, i, k, stream) for p, i, k in zip(p1s, insurers, keys, strict=True)],
        )
        return len(p1s)

    return apply


def unregistered_holdings(ctx: NodeContext, by_hospital: dict[str, int]) -> list[str]:
    """The hospitals whose visits in `by_hospital` no registration of their own covers: fewer
    rows registered in the log by the hospital itself (`ASSET_REGISTERED`, its actor the
    owner) than are held as its visits."""
    holder = operator_log(ctx)
    registered: dict[str, int] = {}
    with holder.lock:
        holder.log.sync()
        for log_entry in holder.log.entries(kind=ASSET_REGISTERED):
            event = log_entry.entry.event
            if event.payload.get("owner") == event.actor:
                registered[event.actor] = (registered.get(event.actor, 0)
                                           + int(event.payload.get("rows", 0)))
    return sorted(h for h, rows in by_hospital.items() if rows > registered.get(h, 0))


def circulation_summary(ctx: NodeContext) -> CirculationSummary:
    """Counts and digests of what the operator holds (opening every sealed field)."""
    frame = read_visits(ctx)
    with ctx.store.lock:
        persons = ctx.store.conn.execute(
            f"SELECT p1, insurer, public_key FROM {PERSONS_TABLE}").fetchall()
        sealed = [name for name in CIRCULATION_FIELDS[2:] if ctx.store.conn.execute(
            f"SELECT 1 FROM {VISITS_TABLE} WHERE typeof({name}) = 'blob' LIMIT 1").fetchone()]
    return CirculationSummary(
        rows=len(frame),
        digest=circulation_digest(frame),
        persons=len(persons),
        persons_digest=persons_digest([p for p, _, _ in persons], [i for _, i, _ in persons],
                                      [k for _, _, k in persons]),
        by_hospital=frame.groupby("hospital_id").size().astype(int).to_dict() if len(frame) else {},
        sealed_columns=sealed,
    )


# --- routes ------------------------------------------------------------------------------


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()
    receiver = BatchReceiver(ctx.store)

    def internal(kind: str, caller: Caller, stream: str) -> str:
        return f"circ-{kind}:{caller.name}:{stream}"

    mount_batch_stream(router, CIRCULATION_VISITS, receiver,
                       lambda caller, stream: internal("visits", caller, stream),
                       lambda caller, stream, idx: _apply_visits(ctx, stream, idx),
                       "published visits")
    mount_batch_stream(router, CIRCULATION_PERSONS, receiver,
                       lambda caller, stream: internal("persons", caller, stream),
                       lambda caller, stream, idx: _apply_persons(stream),
                       "(p1, insurer, consent public key) triples")

    @mount(router, REGISTER)
    def register(body: Registration, caller: Caller) -> CirculationSummary:
        """Check the whole holding against the publisher's digests, then register it."""
        summary = circulation_summary(ctx)
        if (summary.rows, summary.digest) != (body.rows, body.digest):
            raise RegistrationMismatch(
                f"operator holds {summary.rows} visits (digest {summary.digest[:12]}), "
                f"publisher says {body.rows} (digest {body.digest[:12]})"
            )
        if (summary.persons, summary.persons_digest) != (body.persons, body.persons_digest):
            raise RegistrationMismatch(
                f"operator holds {summary.persons} consumer keys, publisher says {body.persons}"
            )
        unregistered = unregistered_holdings(ctx, summary.by_hospital)
        if unregistered:
            raise RegistrationMismatch(
                f"visits of {', '.join(unregistered)} are not covered by their own signed "
                "data asset registrations")
        with ctx.store.lock, ctx.store.conn as conn:
            conn.execute(
                "INSERT OR REPLACE INTO circ_registrations (stream, owner, rows, digest, persons,"
                " persons_digest, grades) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (body.stream, caller.name, body.rows, body.digest, body.persons,
                 body.persons_digest, json.dumps(body.grades)),
            )
        append_entry(ctx, "data_registered", {
            "dataset": "claim_check.visits", "owner": caller.name, "stream": body.stream,
            "rows": summary.rows, "digest": summary.digest, "persons": summary.persons,
            "persons_digest": summary.persons_digest,
            "sealed_columns": summary.sealed_columns,
            "grades": [f"{k}={v}" for k, v in sorted(body.grades.items())],
        })
        ctx.log.event("data_registered", owner=caller.name, rows=summary.rows,
                      persons=summary.persons)
        return summary

    @mount(router, CIRCULATION_SUMMARY)
    def summary(caller: Caller) -> CirculationSummary:
        """Counts and digests of the operator's holding (its local operator only)."""
        return circulation_summary(ctx)

    return [router]


OPERATOR_CIRCULATION_SERVICE = Service(
    name="circulation",
    roles=(Role.OPERATOR,),
    routers=_routes,
    components=((COMPONENT, MIGRATIONS), (batches.COMPONENT, batches.MIGRATIONS)),
)
