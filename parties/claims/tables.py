"""The operator's shared-domain tables: each insurer's visit rows as the claim engines need them.

The operator holds the anonymized visits (`circ_visits`, opened with its keyring) and
each insurer's domain tokens (`domain_tokens`). Per shared domain it builds a table: the
rows in a secret order of its own, the candidate index keyed by (domain token, hospital),
the person behind each token and the consent key that person registered for this
insurer, as the health authority delivered it (`circ_persons`, one key per person and
insurer). The table is rebuilt when a new publication is registered or the domain's key
rotates (k2[d], or k1, which moves every domain's tokens).

Why the secret order: the regulator sees the row number of every candidate slot (`ss`
batches) and gets one share table per domain. Were the rows in the same order in every
domain (as sorting by `visit_ref` did), a visit would sit at the same row number in
insurer-a's and insurer-b's tables, and the regulator would link the two insurers'
claims about one person by it. Each build instead ranks the rows by HMAC-SHA256 under
a fresh 32-byte key from `os.urandom`, used once and dropped: the order is a uniformly
random permutation, independent across domains and across rebuilds of one domain, so a
row number in one table says nothing about the same visit's row number in another
(they are equal only by chance, 1 in n).
"""

import hmac
import os
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mpc import xid
from mpc.claim import CandidateIndex, encode_visit_rows, ss_shares
from mpc.claim.constants import CLAIM_SCENARIO
from parties.domains.registry import live_domain
from parties.ingest.circulated import read_visits
from parties.runtime.context import NodeContext


@dataclass
class SharedDomainTable:
    """One insurer's shared domain: its rows, candidate index, persons and their keys."""

    domain_id: str
    version: tuple
    rows: np.ndarray  # int64 [n, 3]: admission day, self-pay fen, category
    index: CandidateIndex  # over (domain token, hospital)
    person_of_token: dict[bytes, bytes]
    key_of_person: dict[bytes, bytes]  # p1 -> the consent key registered for this insurer
    visit_refs: tuple[bytes, ...] = ()  # the visit in each row (the operator's own; never sent)
    table_id: str = field(default_factory=lambda: secrets.token_hex(8))
    _shares: tuple[np.ndarray, np.ndarray] | None = None

    def shares(self) -> tuple[np.ndarray, np.ndarray]:
        """(operator share, regulator share), split once per table."""
        if self._shares is None:
            self._shares = ss_shares.split(self.rows)
        return self._shares


def _version(ctx: NodeContext, domain_id: str) -> tuple:
    with ctx.store.lock:
        return (domain_id, *ctx.store.conn.execute(
            "SELECT (SELECT COALESCE(MAX(rowid), 0) FROM circ_visits),"
            " (SELECT COUNT(*) FROM circ_registrations),"
            " (SELECT COALESCE(MAX(registered_at), '') FROM circ_registrations),"
            " (SELECT COALESCE(MAX(rowid), 0) FROM circ_persons),"
            " (SELECT token_epoch FROM domains WHERE domain_id = ?)", (domain_id,)).fetchone())


def secret_row_order(visit_refs: Sequence[bytes]) -> list[int]:
    """A fresh, uniformly random order of a table's rows: their positions, reordered.

    Rows are ranked by HMAC-SHA256(key, visit_ref) under a new 32-byte key that lives only
    in this call, so no two tables share an order and none can be recomputed later.
    """
    key = os.urandom(32)
    tags = [hmac.digest(key, bytes(ref), "sha256") for ref in visit_refs]
    return sorted(range(len(tags)), key=tags.__getitem__)


def _build_table(ctx: NodeContext, insurer: str, domain_id: str, version: tuple
                 ) -> SharedDomainTable:
    with ctx.store.lock:
        tokens = ctx.store.conn.execute(
            "SELECT visit_ref, token FROM domain_tokens WHERE domain_id = ?", (domain_id,)
        ).fetchall()
        persons = ctx.store.conn.execute(
            "SELECT p1, public_key FROM circ_persons WHERE insurer = ?", (insurer,)).fetchall()
    visits = read_visits(ctx)
    token_of = {bytes(r): bytes(t) for r, t in tokens}
    if len(visits):
        # (pandas' isin mishandles bytes with NULs: test membership in Python)
        visits = visits[[bytes(r) in token_of for r in visits["visit_ref"]]]
        needed = ["admission_date", "self_pay_fen", "diagnosis_code", "hospital_id"]
        complete = visits[needed].notna().all(axis=1)
        if not complete.all():
            ctx.log.event("claim_rows_incomplete", domain=domain_id,
                          rows=int((~complete).sum()))
        visits = visits[complete].reset_index(drop=True)
        visits = visits.iloc[secret_row_order(visits["visit_ref"].tolist())].reset_index(
            drop=True)
    else:
        visits = pd.DataFrame(columns=["visit_ref", "p1", "hospital_id", "admission_date",
                                       "self_pay_fen", "diagnosis_code"])
    row_tokens = [token_of[bytes(r)] for r in visits["visit_ref"]]
    rows = encode_visit_rows(visits) if len(visits) else np.zeros((0, 3), dtype=np.int64)
    keys = list(zip(row_tokens, visits["hospital_id"].astype(str), strict=True))
    person_of_token = {t: bytes(p) for t, p in zip(row_tokens, visits["p1"], strict=True)}
    key_of_person = {bytes(p): bytes(k) for p, k in persons}
    # Persons with a key delivered for this insurer but no visit held still get an answer
    # (nothing found): their domain token is computed here, once per table, with the shared
    # domain's key.
    without_visits = sorted(set(key_of_person) - set(person_of_token.values()))
    if without_visits:
        key = ctx.secrets.xid_key(f"domain:{domain_id}")  # operator_domains' key name
        person_of_token.update(zip(xid.rekey(key, without_visits), without_visits, strict=True))
    table = SharedDomainTable(
        domain_id=domain_id, version=version, rows=rows, index=CandidateIndex(keys),
        person_of_token=person_of_token, key_of_person=key_of_person,
        visit_refs=tuple(bytes(r) for r in visits["visit_ref"]),
    )
    ctx.log.event("claim_table_built", domain=domain_id, rows=len(rows), table=table.table_id)
    return table


class SharedDomainTables:
    """The operator's current table per insurer, rebuilt when its version changes."""

    def __init__(self) -> None:
        self.by_insurer: dict[str, SharedDomainTable] = {}
        self.lock = threading.Lock()


def shared_domain_table(ctx: NodeContext, insurer: str) -> SharedDomainTable:
    """The current table of `insurer`'s claim-check shared domain (rebuilt after a new
    publication)."""
    domain_id = live_domain(ctx, CLAIM_SCENARIO, insurer)
    cache = ctx.component(SharedDomainTables, SharedDomainTables)
    tables = cache.by_insurer
    version = _version(ctx, domain_id)
    with cache.lock:
        table = tables.get(insurer)
        if table is None or table.version != version:
            table = tables[insurer] = _build_table(ctx, insurer, domain_id, version)
        return table
