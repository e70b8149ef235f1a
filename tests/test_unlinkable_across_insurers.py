"""Unlinkable across insurers: the regulator's linkage attack, mounted with its full view.

The regulator here is a curious node (`tests/curious_regulator.py`): its own code, plus a
record of everything its claim-check side receives (each `ss` batch's share table and the
row number of every slot, each share table's shared domain, each request's insurer and
the consent id of each claim) and its store, which keeps every consent it registered.

1. Row numbers. Insurer-a and insurer-b check claims about the same people, three claims
   per person at the hospital of their one visit there, in `ss` through the nodes. The
   regulator first strips the dummies, as it can: a person's own row is in the slots of
   all three claims made under one consent, while dummies are drawn afresh per claim.
   Then it links each insurer-a consent to the insurer-b consent whose own row has the
   same number. It does the same between insurer-a's checks before and after a rotation
   of insurer-a's key k2 and of k1 (each rebuilds the table). With each table's secret
   order it links no more than chance; the control, the same attack on the order the
   operator used before (rows sorted by `visit_ref`, replayed in this process from the
   operator's real store), links every person.
2. Consent keys. The regulator's store holds each person's consents to both insurers: the
   public keys differ and none is shared between the insurers' consents (control: one key
   per person, as before, links them all by an equality join); no public offset relates
   a person's two keys (control: an additive-tweak derivation, which would); and a
   consent signed with the person's insurer-a key is refused for insurer-b at the
   operator, nothing billed.
3. The health authority keeps the delivery strict: one key serving two insurers of one
   person, or a batch in the single-key format, is refused and stores nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nacl.bindings
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.consent import Consent, issue_consent
from mpc.claim.candidates import CandidateIndex, uniform_below
from mpc.claim.constants import DEFAULT_K, RECORD_COLUMNS, VERDICT_OUTPUTS
from parties.claims import tables
from parties.claims.api import CHECK
from parties.claims.client import ClaimBatchFailed
from parties.domains.api import LIST_DOMAINS
from parties.ingest.api import CONSUMER_KEYS
from parties.node import open_node
from parties.runtime import supervisor
from parties.runtime.batches import send_batches
from parties.runtime.client import NodeClient
from parties.runtime.errors import RemoteError
from scenarios.claim_check.generator import consumer_master_seed
from tests.attack_helpers import ClaimWorld, ledger_entries, read_only, refusal_rows, wait_for
from tests.curious_regulator import read_view

pytestmark = pytest.mark.slow

PEOPLE = 24
CLAIMS_PER_PERSON = 3
INSURERS = ("insurer-a", "insurer-b")
# The regulator links a person's two consents only by chance: P(own rows equal) = 1/n per
# person, n the table's rows (about 300 here). Four or more chance links out of 24 have
# probability ~1e-6; the old order links all 24.
CHANCE_LINKS = 3


@dataclass
class Observed:
    """One `ss` request as the regulator saw it."""

    insurer: str
    table_id: str
    domain: str | None
    consent_ids: list[str]
    slots: list[frozenset[int]]


@dataclass
class Linkage:
    world: ClaimWorld
    people: pd.DataFrame  # national_id, hospital_id, admission_date: one visit at that hospital
    claims: dict[str, pd.DataFrame]
    consents: dict[str, dict[str, Consent]]  # insurer -> national id -> consent
    person_of_consent: dict[str, str]
    tokens: dict[str, dict[str, bytes]]  # insurer -> national id -> current domain token
    # label -> the log ids the regulator knows the request by (the request's, its renewal's)
    requests: dict[str, tuple[str, str]]


# --- the curious regulator -----------------------------------------------------------------


def _start_curious_regulator(world: ClaimWorld) -> None:
    """Replace the regulator's process by the curious one (same state, keys and ports)."""
    fed = world.fed
    supervisor.stop_node(fed.state, "regulator")
    paths = fed.state.node("regulator")
    with open(paths.stdout, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.curious_regulator", "--name", "regulator",
             "--topology", str(fed.topology_path), "--state", str(fed.state.root)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    paths.pid.write_text(str(proc.pid))
    status = supervisor.wait_healthy(fed.state, fed.topology, ["regulator"], timeout=60)
    assert status["regulator"] == "ok", status


def _observed(world: ClaimWorld) -> dict[str, Observed]:
    """Every computed `ss` request in the regulator's record, by request id."""
    view = read_view(world.fed.state)
    domains = {r["table_id"]: r["domain"] for r in view if r["kind"] == "share_table"}
    relays = {r["request_id"]: r for r in view if r["kind"] == "request"}
    out = {}
    for record in view:
        if record["kind"] != "batch":
            continue
        rid, _, table_id = record["batch_id"].rpartition("|")
        relay = relays[rid]
        out[rid] = Observed(relay["insurer"], table_id, domains.get(table_id),
                            relay["consent_ids"], [frozenset(s) for s in record["row_index"]])
    return out


# --- the regulator's attack ---------------------------------------------------------------


def own_rows(seen: Observed) -> dict[str, frozenset[int]]:
    """Each consent's rows that are in the slots of every claim made under it: the
    person's own rows when dummies are drawn afresh per claim (they drop out), all K
    rows when they are fixed per claim key."""
    common: dict[str, frozenset[int]] = {}
    for consent_id, slots in zip(seen.consent_ids, seen.slots, strict=True):
        common[consent_id] = common[consent_id] & slots if consent_id in common else slots
    return {c: rows for c, rows in common.items() if rows}


def link(first: Observed, second: Observed) -> dict[str, str]:
    """The regulator's guess: each consent of `first` -> the one consent of `second` whose
    own rows have the same numbers."""
    by_rows: dict[frozenset[int], list[str]] = defaultdict(list)
    for consent_id, rows in own_rows(second).items():
        by_rows[rows].append(consent_id)
    return {c: by_rows[rows][0] for c, rows in own_rows(first).items()
            if len(by_rows.get(rows, ())) == 1}


def correct_links(lk: Linkage, first: Observed, second: Observed) -> int:
    guesses = link(first, second)
    return sum(lk.person_of_consent[a] == lk.person_of_consent[b] for a, b in guesses.items())


# --- the world ----------------------------------------------------------------------------


def _people(world: ClaimWorld) -> pd.DataFrame:
    """PEOPLE persons with exactly one visit at some hospital (that visit's hospital, date)."""
    visits = pq.read_table(world.data / "ground_truth" / "visits.parquet").to_pandas()
    complete = visits.dropna(subset=["admission_date", "self_pay_fen", "diagnosis_code"])
    per = visits.groupby(["national_id", "hospital_id"]).size().rename("n").reset_index()
    single = per.loc[per["n"] == 1, ["national_id", "hospital_id"]]
    found = complete.merge(single, on=["national_id", "hospital_id"])
    found = found.drop_duplicates("national_id").sort_values("national_id")
    assert len(found) >= PEOPLE
    return found.head(PEOPLE)[["national_id", "hospital_id", "admission_date"]].reset_index(
        drop=True)


def _claims(people: pd.DataFrame, insurer: str) -> pd.DataFrame:
    rows = []
    for person in people.itertuples(index=False):
        for j in range(CLAIMS_PER_PERSON):
            day = pd.Timestamp(person.admission_date) + pd.Timedelta(days=15 * j)
            rows.append({"claim_id": f"L{insurer[-1]}-{person.national_id}-{j}",
                         "insurer": insurer, "national_id": person.national_id,
                         "hospital_id": person.hospital_id,
                         "visit_date": day.strftime("%Y-%m-%d"), "claimed_fen": 100,
                         "diagnosis_code": "J18.9"})
    frame = pd.DataFrame(rows)
    if insurer == "insurer-b":  # another order: the regulator cannot link by position
        frame = frame.iloc[::-1]
    return frame.reset_index(drop=True)


def _domain_of(world: ClaimWorld, insurer: str) -> str:
    with NodeClient(world.fed.state, world.fed.topology, "operator") as client:
        domains = client.call("operator", LIST_DOMAINS)
    return next(d.domain_id for d in domains if d.data_user == insurer)


def _check(lk_requests: dict[str, tuple[str, str]], client, claims, consents,
           label: str) -> None:
    """One ss batch; each call asks other amounts, so no answer comes from the book."""
    rid = f"link-{label}"
    client.check(claims.assign(claimed_fen=100 + len(lk_requests)), consents, "ss",
                 request_id=rid)
    lk_requests[label] = (client.log_id(rid), client.log_id(f"{rid}-renewed"))


@pytest.fixture(scope="module")
def lk(tmp_path_factory) -> Linkage:
    world = ClaimWorld(tmp_path_factory.mktemp("unlink"), patients=200, claims=24)
    try:
        world.ingest()
        world.sign_contracts(checks_per_consent_per_day=1000)  # many checks per consent
        _start_curious_regulator(world)
        people = _people(world)
        claims = {i: _claims(people, i) for i in INSURERS}
        consents = {i: {n: world.consent(n, i) for n in people["national_id"]} for i in INSURERS}
        person_of = {c.consent_id: n for by in consents.values() for n, c in by.items()}
        requests: dict[str, tuple[str, str]] = {}
        clients = {i: world.client(i) for i in INSURERS}
        try:
            for insurer, client in clients.items():
                client.register_consents(consents[insurer].values())
                _check(requests, client, claims[insurer], consents[insurer], insurer)
            a = clients["insurer-a"]
            world.cli("domain", "rotate", _domain_of(world, "insurer-a"))
            _check(requests, a, claims["insurer-a"], consents["insurer-a"], "insurer-a-k2")
            world.cli("govern", "rotate-k1")
            _check(requests, a, claims["insurer-a"], consents["insurer-a"], "insurer-a-k1")
            _check(requests, clients["insurer-b"], claims["insurer-b"], consents["insurer-b"],
                   "insurer-b-k1")
            tokens = {i: {n: c.tokens([n])[0] for n in people["national_id"]}
                      for i, c in clients.items()}
        finally:
            for client in clients.values():
                client.close()
        yield Linkage(world, people, claims, consents, person_of, tokens, requests)
    finally:
        world.down()


def _seen(lk: Linkage, label: str) -> Observed:
    observed = _observed(lk.world)
    first, renewed = lk.requests[label]
    seen = observed.get(first) or observed[renewed]  # after a rotation: renewed once
    return seen


# --- 1. row numbers ------------------------------------------------------------------------


def test_the_regulator_saw_each_domain_and_rebuild_as_its_own_share_table(lk):
    a, b = _seen(lk, "insurer-a"), _seen(lk, "insurer-b")
    a_k2, a_k1 = _seen(lk, "insurer-a-k2"), _seen(lk, "insurer-a-k1")
    assert (a.insurer, b.insurer) == INSURERS
    assert a.domain and b.domain and a.domain != b.domain
    assert len({a.table_id, b.table_id, a_k2.table_id, a_k1.table_id}) == 4
    assert a.domain == a_k2.domain == a_k1.domain
    # The attack's first step fails: a claim key's dummies are fixed for a table's build,
    # so intersecting a consent's three claims leaves all K rows, never the person's own
    # row (the control below, on the old code, isolates nearly everyone's).
    for seen in (a, b, a_k2, a_k1):
        assert sum(len(rows) == 1 for rows in own_rows(seen).values()) <= 2


@pytest.mark.parametrize("first, second", [
    ("insurer-a", "insurer-b"),  # two shared domains
    ("insurer-a-k1", "insurer-b-k1"),  # two shared domains, after a k1 rotation
    ("insurer-a", "insurer-a-k2"),  # one domain before and after its k2 rotation
    ("insurer-a-k2", "insurer-a-k1"),  # one domain before and after a k1 rotation
])
def test_the_regulator_links_no_person_by_row_numbers(lk, first, second):
    assert correct_links(lk, _seen(lk, first), _seen(lk, second)) <= CHANCE_LINKS


def _replayed_views(lk: Linkage
                    ) -> tuple[dict[str, tables.SharedDomainTable], dict[str, Observed]]:
    """The operator's tables built here by its code from its real store, and the
    regulator's view of the same claims planned on them."""
    ctx = open_node(lk.world.fed.state, lk.world.fed.topology, "operator")
    try:
        built = {i: tables.shared_domain_table(ctx, i) for i in INSURERS}
    finally:
        ctx.store.close()
    views = {}
    for insurer, table in built.items():
        claims = lk.claims[insurer]
        keys = [(lk.tokens[insurer][n], h)
                for n, h in zip(claims["national_id"], claims["hospital_id"], strict=True)]
        slots = table.index.plan(keys, DEFAULT_K)
        views[insurer] = Observed(
            insurer, table.table_id, table.domain_id,
            [lk.consents[insurer][n].consent_id for n in claims["national_id"]],
            [frozenset(r) for r in slots.row_index.tolist()])
    return built, views


def _isolated(lk: Linkage, table: tables.SharedDomainTable, seen: Observed) -> int:
    """How many persons' own rows the attack found exactly: the row of their visit at the
    claimed hospital (the operator's knowledge)."""
    found = own_rows(seen)
    hits = 0
    for person in lk.people.itertuples(index=False):
        rows = table.index.rows_by_key.get((lk.tokens[seen.insurer][person.national_id],
                                            person.hospital_id), [])
        consent_id = lk.consents[seen.insurer][person.national_id].consent_id
        hits += len(rows) == 1 and found.get(consent_id) == frozenset(rows)
    return hits


def test_control_the_old_sorted_order_links_every_person(lk, monkeypatch):
    """The same attack against rows sorted by visit_ref, as the operator ordered them
    before: the visit has one row number in both domains, and every person is linked."""
    monkeypatch.setattr(tables, "secret_row_order", lambda refs: sorted(
        range(len(refs)), key=lambda i: bytes(refs[i]).hex()))
    # and dummies drawn afresh for every claim, as the planner drew them before
    monkeypatch.setattr(CandidateIndex, "dummy_rows",
                        lambda self, key, count, real=(): uniform_below(self.n_rows, count))
    built, views = _replayed_views(lk)
    for insurer in INSURERS:  # the attack isolates the person's own row
        assert _isolated(lk, built[insurer], views[insurer]) >= PEOPLE - 2
    assert built["insurer-a"].visit_refs == built["insurer-b"].visit_refs
    assert correct_links(lk, views["insurer-a"], views["insurer-b"]) >= PEOPLE - 2


def test_each_domain_and_each_build_has_its_own_order(lk):
    """White box, on the operator's real store: the fraction of visits at the same row
    number in two tables is chance (a random permutation has 1 fixed point on average)."""
    built, views = _replayed_views(lk)
    rebuilt, _ = _replayed_views(lk)
    a, b, a2 = built["insurer-a"], built["insurer-b"], rebuilt["insurer-a"]
    assert sorted(a.visit_refs) == sorted(b.visit_refs) == sorted(a2.visit_refs)
    n = len(a.visit_refs)
    assert n >= 200
    for one, other in ((a, b), (a, a2)):
        position = {ref: i for i, ref in enumerate(other.visit_refs)}
        same = sum(position[ref] == i for i, ref in enumerate(one.visit_refs))
        assert same <= 8, f"{same} of {n} visits at the same row number"  # P(>8) ~ 1e-6
    for insurer in INSURERS:  # the attack still isolates each person's row, but ...
        assert _isolated(lk, built[insurer], views[insurer]) <= 2  # fixed dummies
    # ... the row numbers of one person's visit in the two domains are unrelated
    assert correct_links(lk, views["insurer-a"], views["insurer-b"]) <= CHANCE_LINKS


# --- 2. consent keys ------------------------------------------------------------------------


def _registered_keys(lk: Linkage) -> dict[str, tuple[str, str]]:
    """The regulator's store: consent id -> (insurer, the consent's public key)."""
    conn = read_only(lk.world.fed.state.node("regulator").db)
    try:
        rows = conn.execute("SELECT document FROM consents").fetchall()
    finally:
        conn.close()
    out = {}
    for (document,) in rows:
        consent = Consent.parse(document)
        out[consent.consent_id] = (consent.terms.insurer, consent.terms.subject.public_key)
    return out


def test_a_persons_consent_keys_differ_across_insurers_in_the_regulators_store(lk):
    held = _registered_keys(lk)
    keys = {i: {held[c.consent_id][1] for c in lk.consents[i].values()} for i in INSURERS}
    assert all(len(k) == PEOPLE for k in keys.values())
    for nid in lk.people["national_id"]:
        key_a = held[lk.consents["insurer-a"][nid].consent_id][1]
        key_b = held[lk.consents["insurer-b"][nid].consent_id][1]
        assert key_a != key_b
    # the regulator's equality join over everything it holds links nobody
    by_insurer: dict[str, set[str]] = defaultdict(set)
    for insurer, key in held.values():
        by_insurer[insurer].add(key)
    assert not by_insurer["insurer-a"] & by_insurer["insurer-b"]


def test_control_one_key_per_person_is_linked_by_an_equality_join(lk):
    """Before: one key per consumer (the generator's former key was today's master seed),
    so each person's two consents carry the same key and the join links all of them."""
    now = datetime.now(UTC)
    signed = {i: {} for i in INSURERS}
    for nid in lk.people["national_id"].head(6):
        single = Ed25519PrivateKey.from_private_bytes(consumer_master_seed(23, nid))
        for insurer in INSURERS:
            signed[insurer][nid] = issue_consent(
                single, insurer=insurer, purpose="claim_settlement",
                columns=RECORD_COLUMNS, outputs=VERDICT_OUTPUTS, not_before=now,
                not_after=now + timedelta(days=1)).terms.subject.public_key
    linked = set(signed["insurer-a"].values()) & set(signed["insurer-b"].values())
    assert len(linked) == 6


def _point_difference(key_b: str, key_a: str) -> bytes:
    return nacl.bindings.crypto_core_ed25519_sub(bytes.fromhex(key_b), bytes.fromhex(key_a))


def test_no_public_offset_relates_a_persons_two_keys(lk):
    """A derivation by public tweak (pub_X = pub + t_X·G) would give every person the same
    pub_B - pub_A: the regulator would link by testing it. Ours gives a different one each."""
    held = _registered_keys(lk)
    offsets = set()
    for nid in lk.people["national_id"]:
        key_a = held[lk.consents["insurer-a"][nid].consent_id][1]
        key_b = held[lk.consents["insurer-b"][nid].consent_id][1]
        offsets.add(_point_difference(key_b, key_a))
    assert len(offsets) == PEOPLE
    # control: the additive-tweak derivation, which a public offset does link
    tweak = {i: nacl.bindings.crypto_scalarmult_ed25519_base_noclamp(
        nacl.bindings.crypto_core_ed25519_scalar_reduce(os.urandom(64))) for i in INSURERS}
    tweaked = set()
    for nid in lk.people["national_id"].head(6):
        base = nacl.bindings.crypto_scalarmult_ed25519_base_noclamp(
            nacl.bindings.crypto_core_ed25519_scalar_reduce(consumer_master_seed(23, nid) * 2))
        pub = {i: nacl.bindings.crypto_core_ed25519_add(base, tweak[i]) for i in INSURERS}
        tweaked.add(_point_difference(pub["insurer-b"].hex(), pub["insurer-a"].hex()))
    assert len(tweaked) == 1


def test_a_consent_signed_with_the_insurer_a_key_is_refused_for_insurer_b(lk):
    world = lk.world
    nid = lk.people["national_id"][0]
    claim = lk.claims["insurer-b"][lk.claims["insurer-b"]["national_id"] == nid].head(1)
    now = datetime.now(UTC)
    wrong_key = issue_consent(  # names insurer-b, signed with the key for insurer-a
        world.consent_key(nid, "insurer-a"), insurer="insurer-b",
        purpose="claim_settlement", columns=RECORD_COLUMNS, outputs=VERDICT_OUTPUTS,
        not_before=now - timedelta(minutes=5), not_after=now + timedelta(days=1))
    rid = "link-wrong-insurer-key"
    with world.client("insurer-b") as client:
        client.register_consents([wrong_key])  # a valid signature, addressed to insurer-b
        with pytest.raises(ClaimBatchFailed) as refused:
            client.check(claim, {nid: wrong_key}, "ss", request_id=rid)
        # control: the person's own insurer-b consent is answered
        assert len(client.check(claim, lk.consents["insurer-b"], "ss")) == 1
    # the key is about the person: the one uniform refusal
    assert refused.value.http_status == 403 and refused.value.error == "ClaimNotCheckable"
    log_id = world.fed.log_id("insurer-b", "regulator", rid)
    assert wait_for(lambda: (log_id, CHECK.path, "ClaimNotCheckable") in [
        r[:3] for r in refusal_rows(world.fed, "regulator")])
    assert not [e for e in ledger_entries(world.fed)
                if e[0] == "query_answered" and e[1] == log_id]


# --- 3. the health authority's delivery --------------------------------------------------------


def _ha_keys(world: ClaimWorld) -> list[tuple]:
    conn = read_only(world.fed.state.node("health-authority").db)
    try:
        return conn.execute("SELECT p1, insurer, public_key FROM ha_consumer_keys"
                            " ORDER BY p1, insurer").fetchall()
    finally:
        conn.close()


@pytest.mark.parametrize("columns", [
    {"national_id": ["110101199003074477"] * 2, "insurer": list(INSURERS),
     "public_key": ["ab" * 32] * 2},  # one key for two insurers
    {"national_id": ["110101199003074477"], "public_key": ["cd" * 32]},  # the single-key format
])
def test_the_health_authority_refuses_a_key_that_is_not_per_insurer(lk, columns):
    world = lk.world
    before = _ha_keys(world)
    stream = f"k-refused-{len(columns)}"
    with NodeClient(world.fed.state, world.fed.topology, "health-authority") as client, \
            pytest.raises(RemoteError) as refused:
        send_batches(client, "health-authority", CONSUMER_KEYS, stream, pa.table(columns))
    assert refused.value.error == "AuthorityError" and refused.value.http_status == 400
    assert _ha_keys(world) == before
