"""The regulator's statistic on private intersection-sum, through real nodes.

One module-scoped federation (hospitals, health authority, operator, regulator,
insurer-a) with generated data ingested by `cogov govern ingest`. The statistic —
the total self-pay of insurer-a's claimants at a hospital in a month — is computed
through the nodes and compared with the same sum over the generator's ground truth.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from governance.ledger import decode_leaf
from mpc.errors import IntersectionTooSmall
from mpc.psi import IdHolder, IntersectionPolicy, JoinOutcome
from parties.runtime.client import NodeClient
from parties.runtime.errors import FlowNotAllowed, RemoteError
from parties.runtime.node_log import read_log
from parties.runtime.routes import Kind
from parties.stats.api import (
    OPERATOR_JOIN,
    SELF_PAY_JOIN,
    SELF_PAY_OUTCOME,
    SelfPayQuery,
    StatsAnswer,
    StatsJoin,
)
from parties.stats.client import claimant_self_pay
from scenarios.claim_check.generator import generate
from tests.federation import Federation

NODES = ["hospital-1", "hospital-2", "hospital-3", "health-authority", "operator",
         "regulator", "insurer-a"]
INSURER = "insurer-a"


@dataclass
class StatsFed:
    fed: Federation
    data: Path
    visits: pd.DataFrame
    claimants: list[str]

    def client(self, node: str = INSURER) -> NodeClient:
        return NodeClient(self.fed.state, self.fed.topology, node, timeout=300)

    def cli(self, *args: str) -> tuple[int, str]:
        from scenarios.cli import app

        result = CliRunner().invoke(app, [*args, "--state", str(self.fed.state.root),
                                          "--topology", str(self.fed.topology_path)])
        return result.exit_code, result.output

    def oracle(self, hospital: str, first: str, last: str, max_value: int,
               ids: list[str] | None = None) -> tuple[int, int, list[str]]:
        """(size, sum, matched ids) over the ground truth, per-person sums clipped."""
        v = self.visits
        chosen = v[(v["hospital_id"] == hospital) & v["month"].between(first, last)
                   & v["national_id"].isin(set(ids if ids is not None else self.claimants))]
        per = chosen.groupby("national_id")["self_pay_fen"].sum().clip(upper=max_value)
        return len(per), int(per.sum()), sorted(per.index)

    def ledger(self) -> list:
        conn = sqlite3.connect(f"file:{self.fed.state.node('operator').db}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT leaf FROM ledger_entries ORDER BY leaf_index").fetchall()
        finally:
            conn.close()
        return [decode_leaf(bytes(r[0])).entry.event for r in rows]

    def entries(self, kind: str, session: str) -> list:
        return [e for e in self.ledger() if e.kind == kind
                and e.payload.get("statistic") == "claimant_self_pay"
                and e.payload.get("session") == session]

    def session_rows(self, session: str) -> int:
        db = self.fed.state.node("regulator").db
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT COUNT(*) FROM stats_sessions WHERE session = ?",
                                (session,)).fetchone()[0]
        finally:
            conn.close()

    def answers(self) -> list[StatsAnswer]:
        code, out = self.cli("stats", "answers", "--json", "--limit", "100")
        assert code == 0, out
        return [StatsAnswer.model_validate_json(line) for line in out.splitlines() if line]


@pytest.fixture(scope="module")
def sf(tmp_path_factory) -> Iterator[StatsFed]:
    root = tmp_path_factory.mktemp("stats")
    data = root / "data"
    generate(data, patients=900, claims=900, seed=8, progress=False)
    fed = Federation(root, nodes=NODES)
    fed.up()
    try:
        from scenarios.cli import app

        result = CliRunner().invoke(app, [
            "govern", "ingest", "--data", str(data), "--batch-rows", "1000",
            "--state", str(fed.state.root), "--topology", str(fed.topology_path)])
        assert result.exit_code == 0, result.output
        visits = pd.read_parquet(data / "ground_truth" / "visits.parquet")
        visits["month"] = pd.to_datetime(visits["admission_date"]).dt.strftime("%Y-%m")
        claims = pd.read_csv(data / "claims.csv", dtype={"national_id": str})
        claimants = list(dict.fromkeys(claims.loc[claims["insurer"] == INSURER, "national_id"]))
        yield StatsFed(fed, data, visits, claimants)
    finally:
        fed.down()


def _busiest_month(sf: StatsFed) -> tuple[str, str, int]:
    v = sf.visits[sf.visits["national_id"].isin(set(sf.claimants))]
    counts = v.groupby(["hospital_id", "month"])["national_id"].nunique()
    (hospital, month), size = counts.idxmax(), int(counts.max())
    return hospital, month, size


def test_statistic_through_the_nodes_equals_the_ground_truth(sf, tmp_path):
    hospital, month, _ = _busiest_month(sf)
    size, total, _ = sf.oracle(hospital, month, month, 10_000_000)
    assert size >= 10, "the busiest month should pass the minimum-size guard"
    claims = tmp_path / "claims.csv"
    pd.read_csv(sf.data / "claims.csv", dtype=str).to_csv(claims, index=False)
    code, out = sf.cli("stats", "claimant-self-pay", "--insurer", INSURER, "--hospital",
                       hospital, "--month", month, "--claims", str(claims), "--json")
    assert code == 0, out
    answer = StatsAnswer.model_validate_json(out.strip().splitlines()[-1])
    assert answer.status == "answered" and answer.result is not None
    assert (answer.result.size, answer.result.sum) == (size, total)
    assert not answer.result.noisy
    assert answer.claimants == len(sf.claimants)
    operator_rows = sf.visits[(sf.visits["hospital_id"] == hospital)
                              & (sf.visits["month"] == month)]["national_id"].nunique()
    assert answer.operator_rows == operator_rows

    # The regulator keeps the answer; the log commits to it without carrying the statistic.
    assert answer in sf.answers()
    (entry,) = sf.entries("query_answered", answer.session)
    assert entry.actor == "regulator"
    assert entry.payload["answer_sha256"] == answer.digest()
    assert entry.payload["claimants"] == len(sf.claimants)
    assert entry.payload["hospital"] == hospital and entry.payload["party"] == INSURER
    assert total not in entry.payload.values() and "sum" not in entry.payload
    # Nobody's ids or tokens travel in the clear: the operator's log names counts only.
    joined = [e for e in read_log(sf.fed.state.node("operator").log)
              if e["event"] == "stats_joined" and e.get("session") == answer.session]
    assert joined and joined[0]["rows"] == operator_rows


def test_a_window_of_months_through_the_api(sf):
    query = SelfPayQuery(hospital="hospital-2", month="2025-07", through="2026-03")
    size, total, _ = sf.oracle("hospital-2", "2025-07", "2026-03", 2_000_000)
    with sf.client() as client:
        answer = claimant_self_pay(client, sf.claimants, query, max_value=2_000_000)
    assert answer.result is not None
    assert (answer.result.size, answer.result.sum) == (size, total)
    # Clipping at 2,000,000 fen per claimant changed some persons' totals here.
    assert total < sf.oracle("hospital-2", "2025-07", "2026-03", 10**9)[1]


def test_too_small_intersection_is_refused_and_logged(sf, tmp_path):
    hospital, month, _ = _busiest_month(sf)
    _, _, matched = sf.oracle(hospital, month, month, 10_000_000)
    few = matched[:4] + sf.claimants[-20:]  # 4 who match, plus others who may not
    size = sf.oracle(hospital, month, month, 10_000_000, few)[0]
    assert 4 <= size < 10
    claims = tmp_path / "few.csv"
    pd.DataFrame({"insurer": INSURER, "national_id": few}).to_csv(claims, index=False)
    code, out = sf.cli("stats", "claimant-self-pay", "--insurer", INSURER, "--hospital",
                       hospital, "--month", month, "--claims", str(claims))
    assert code == 1 and "IntersectionTooSmall" in out, out

    query = SelfPayQuery(hospital=hospital, month=month)
    with sf.client() as client, pytest.raises(IntersectionTooSmall):
        claimant_self_pay(client, few, query)
    refused = [a for a in sf.answers() if a.status == "refused" and a.claimants == len(few)]
    assert len(refused) == 2
    assert all(a.reason == "IntersectionTooSmall" and a.result is None for a in refused)
    for a in refused:
        (entry,) = sf.entries("query_refused", a.session)
        assert entry.payload["reason"] == "IntersectionTooSmall"
        assert not sf.entries("query_answered", a.session)
    # The session is spent: an outcome sent afterwards is refused, nothing is revealed.
    with sf.client() as client, pytest.raises(RemoteError) as err:
        session = refused[0].session
        client.call("regulator", SELF_PAY_OUTCOME, JoinOutcome(session=session, size=50),
                    params={"session": session})
    assert err.value.http_status == 409 and err.value.error == "ProtocolStateError"


def test_policy_under_the_floor_and_bad_queries_are_refused(sf):
    with sf.client() as client:
        holder = IdHolder([b"t" * 32] * 3, IntersectionPolicy(min_intersection=2))
        body = StatsJoin(query=SelfPayQuery(hospital="hospital-1", month="2026-01"),
                         join=holder.request())
        with pytest.raises(RemoteError) as err:
            client.call("regulator", SELF_PAY_JOIN, body)
        assert (err.value.http_status, err.value.error) == (403, "PolicyBelowFloor")
        assert sf.entries("query_refused", holder.session)[0].payload["reason"] == \
            "PolicyBelowFloor"
        assert sf.session_rows(holder.session) == 0  # a refused join leaves no row

        # The operator refuses a window without visits; passed through, logged, no row.
        empty = IdHolder(sf.claimants[:12], IntersectionPolicy())
        with pytest.raises(RemoteError) as err:
            client.call("regulator", SELF_PAY_JOIN, StatsJoin(
                query=SelfPayQuery(hospital="hospital-1", month="1999-01"), join=empty.request()))
        assert (err.value.http_status, err.value.error) == (403, "IntersectionTooSmall")
        assert sf.entries("query_refused", empty.session)[0].payload["reason"] == \
            "IntersectionTooSmall"
        assert sf.session_rows(empty.session) == 0

        with pytest.raises(RemoteError) as err:
            claimant_self_pay(client, sf.claimants[:20],
                              SelfPayQuery(hospital="hospital-9", month="2026-01"))
        assert (err.value.http_status, err.value.error) == (422, "UnknownHospital")
        with pytest.raises(RemoteError) as err:
            client.request("regulator", "POST", SELF_PAY_JOIN.path, kind=Kind.STATS, json={
                **body.model_dump(mode="json"),
                "query": {"hospital": "hospital-1", "month": "2026-13"}})
        assert err.value.http_status == 422

        # Insurers never reach the operator's half: refused before sending, and by the operator.
        path = OPERATOR_JOIN.path
        with pytest.raises(FlowNotAllowed):
            client.request("operator", "POST", path, kind=Kind.PRODUCT, json={})
        with pytest.raises(RemoteError) as err:
            client.request("operator", "POST", path, kind=Kind.PRODUCT, json={},
                           check_flow=False)
        assert (err.value.http_status, err.value.error) == (403, "FlowNotAllowed")


def test_noisy_answer_is_near_and_released_once(sf):
    first, last, max_value, epsilon = "2025-04", "2026-03", 2_000_000, 4.0
    query = SelfPayQuery(hospital="hospital-1", month=first, through=last)
    size, total, _ = sf.oracle("hospital-1", first, last, max_value)
    assert size >= 30
    with sf.client() as client:
        answer = claimant_self_pay(client, sf.claimants, query, epsilon=epsilon,
                                   max_value=max_value)
        result = answer.result
        assert result is not None and result.noisy
        # Scales: size 2/epsilon = 0.5, sum 2·max_value/epsilon = 1e6 fen; 12 scales is
        # exceeded with probability ~1e-5 on each.
        assert abs(result.size - size) <= 6
        assert abs(result.sum - total) <= 12 * max_value * 2 / epsilon
        assert result.sum != total  # P(zero noise) ~ 5e-7
        # A second noisy release of the same query would let the noise be averaged away.
        with pytest.raises(RemoteError) as err:
            claimant_self_pay(client, sf.claimants, query, epsilon=epsilon * 2,
                              max_value=max_value)
    assert (err.value.http_status, err.value.error) == (409, "NoisyQueryRepeated")
    refused = [e for e in sf.ledger() if e.kind == "query_refused"
               and e.payload.get("reason") == "NoisyQueryRepeated"]
    assert refused and refused[-1].payload["hospital"] == "hospital-1"
    assert json.loads(answer.model_dump_json())["policy"]["epsilon"] == epsilon
