"""The regulator's side of the claimants' self-pay statistic: checks, relay, the answer book.

The regulator checks each query and its policy, relays the insurer's rounds to the
operator (letting the operator's refusals through as they are), keeps every released or
refused answer, and states each in the federation's log (`query_answered`,
`query_refused`) without the statistic itself.
"""

import time
from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel

from mpc.errors import IntersectionTooSmall, MalformedInput, ProtocolStateError
from mpc.psi import IntersectionPolicy, JoinOutcome, JoinRequest, JoinResponse
from parties.ledger.client import append_entry
from parties.ledger.incidents import refuse_under_incident
from parties.runtime.access import Caller
from parties.runtime.client import NodeClient
from parties.runtime.context import NodeContext
from parties.runtime.errors import NodeError, RemoteError
from parties.runtime.mount import mount
from parties.runtime.service import Service
from parties.runtime.topology import Role
from parties.stats.api import (
    ANSWERS,
    MAX_CLAIMANTS,
    OPERATOR_ABANDON,
    OPERATOR_JOIN,
    OPERATOR_REVEAL,
    POINT_BYTES,
    SCENARIO,
    SELF_PAY_JOIN,
    SELF_PAY_OUTCOME,
    SELF_PAY_REFUSAL,
    SESSION_PATTERN,
    SESSION_TTL_S,
    STATISTIC,
    GuardRefusal,
    NoisyQueryRepeated,
    OperatorAbandon,
    OperatorJoin,
    OperatorReveal,
    SelfPayQuery,
    StatisticsRefused,
    StatsAnswer,
    StatsJoin,
    UnknownHospital,
    UnknownSession,
    operator_node,
)
from parties.stats.policy import check_policy

SessionId = Annotated[str, Path(pattern=SESSION_PATTERN)]

COMPONENT = "statistics"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE stats_sessions (
        session TEXT PRIMARY KEY,
        insurer TEXT NOT NULL,
        statistic TEXT NOT NULL,
        query_key TEXT NOT NULL,       -- hospital/first/last month
        query TEXT NOT NULL,           -- JSON SelfPayQuery
        policy TEXT NOT NULL,          -- JSON IntersectionPolicy
        noisy INTEGER NOT NULL,
        claimants INTEGER NOT NULL,
        status TEXT NOT NULL,          -- joined | answered | refused | failed
        answer TEXT,                   -- JSON StatsAnswer once answered or refused
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX stats_sessions_query ON stats_sessions (insurer, statistic, query_key)
    """,
)


def _query_key(query: SelfPayQuery) -> str:
    return f"{query.hospital}/{query.month}/{query.last_month}"


def _payload(insurer: str, query: SelfPayQuery, policy: IntersectionPolicy, session: str,
             claimants: int, **more: Any) -> dict[str, Any]:
    return {
        "statistic": STATISTIC, "party": insurer, "session": session, "scenario": SCENARIO,
        "hospital": query.hospital, "first_month": query.month, "last_month": query.last_month,
        "min_intersection": policy.min_intersection, "max_value_fen": policy.max_value,
        "epsilon": None if policy.epsilon is None else repr(policy.epsilon),
        "noisy": policy.epsilon is not None, "claimants": claimants, **more,
    }


def _log_refusal(ctx: NodeContext, payload: dict[str, Any], reason: str) -> None:
    try:
        append_entry(ctx, "query_refused", {**payload, "reason": reason})
    except Exception as exc:  # the refusal stands even if the log is unreachable
        ctx.log.event("refusal_not_logged", error=type(exc).__name__)
    ctx.log.event("stats_refused", reason=reason, session=payload["session"],
                  party=payload["party"])


class _SessionRow(BaseModel):
    session: str
    insurer: str
    query: SelfPayQuery
    policy: IntersectionPolicy
    claimants: int
    status: str
    updated_at: float


def _session_row(ctx: NodeContext, session: str, insurer: str) -> _SessionRow:
    with ctx.store.lock:
        row = ctx.store.conn.execute(
            "SELECT insurer, query, policy, claimants, status, updated_at FROM stats_sessions"
            " WHERE session = ?", (session,)).fetchone()
    if row is None or row[0] != insurer:
        raise UnknownSession(f"no session {session} of {insurer}")
    found = _SessionRow(session=session, insurer=row[0],
                        query=SelfPayQuery.model_validate_json(row[1]),
                        policy=IntersectionPolicy.model_validate_json(row[2]), claimants=row[3],
                        status=row[4], updated_at=row[5])
    if found.status != "joined":
        raise ProtocolStateError(f"session {session} is {found.status}")
    if found.updated_at < time.time() - SESSION_TTL_S:
        raise UnknownSession(f"session {session} expired")
    return found


def _close(ctx: NodeContext, session: str, status: str, answer: StatsAnswer | None) -> None:
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute(
            "UPDATE stats_sessions SET status = ?, answer = ?, updated_at = ? WHERE session = ?",
            (status, answer.model_dump_json() if answer else None, time.time(), session))


def regulator_join(ctx: NodeContext, insurer: str, body: StatsJoin) -> JoinResponse:
    """Check the query, relay round 1 to the operator, open the session once it answered.

    A refused join leaves no row behind (the refusal is in the log).
    """
    query, join = body.query, body.join
    claimants = len(join.points) // POINT_BYTES
    payload = _payload(insurer, query, join.policy, join.session, claimants)
    try:
        hospitals = {n.name for n in ctx.topology.nodes_with_role(Role.HOSPITAL)}
        if query.hospital not in hospitals:
            raise UnknownHospital(f"{query.hospital!r} is not a hospital of this federation")
        check_policy(join.policy)
        if not join.with_sum:
            raise MalformedInput("this statistic is a sum")
        if claimants > MAX_CLAIMANTS:
            raise MalformedInput(f"at most {MAX_CLAIMANTS} claimants per query")
        _open_session(ctx, insurer, query, join, claimants, check_only=True)
    except (StatisticsRefused, MalformedInput, ProtocolStateError) as exc:
        _log_refusal(ctx, payload, type(exc).__name__)
        raise
    with ctx.client() as client:
        try:
            response = client.call(operator_node(ctx.topology), OPERATOR_JOIN,
                                   OperatorJoin(insurer=insurer, query=query, join=join))
        except RemoteError as exc:
            # The operator's typed refusal (UnknownDomain, IntersectionTooSmall...) goes on as is.
            _log_refusal(ctx, payload, exc.error)
            raise
        try:
            # Checked again: a concurrent noisy join of the same query may have come first.
            _open_session(ctx, insurer, query, join, claimants, check_only=False)
        except (StatisticsRefused, ProtocolStateError) as exc:
            _abandon_at_operator(ctx, client, join.session, insurer)
            _log_refusal(ctx, payload, type(exc).__name__)
            raise
    ctx.log.event("stats_relayed", party=insurer, session=join.session, claimants=claimants)
    return response


def _open_session(ctx: NodeContext, insurer: str, query: SelfPayQuery, join: JoinRequest,
                  claimants: int, *, check_only: bool) -> None:
    noisy = join.policy.epsilon is not None
    key = _query_key(query)
    now = time.time()
    with ctx.store.lock, ctx.store.conn as conn:
        if noisy:
            # A released noisy answer (or refusal), or one on its way, spends the query.
            spent = conn.execute(
                "SELECT session FROM stats_sessions WHERE insurer = ? AND statistic = ? AND"
                " query_key = ? AND noisy = 1 AND (status IN ('answered', 'refused') OR"
                " (status = 'joined' AND updated_at >= ?))",
                (insurer, STATISTIC, key, now - SESSION_TTL_S)).fetchone()
            if spent:
                raise NoisyQueryRepeated(
                    f"a noisy {STATISTIC} for {insurer} at {key} was already released "
                    f"(session {spent[0]}); a repeat would let its noise be averaged away")
        if conn.execute("SELECT 1 FROM stats_sessions WHERE session = ?",
                        (join.session,)).fetchone():
            raise ProtocolStateError(f"session {join.session} was already used")
        if check_only:
            return
        conn.execute(
            "INSERT INTO stats_sessions (session, insurer, statistic, query_key, query, policy,"
            " noisy, claimants, status, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'joined', ?, ?)",
            (join.session, insurer, STATISTIC, key, query.model_dump_json(),
             join.policy.model_dump_json(), int(noisy), claimants, now, now))


def _abandon_at_operator(ctx: NodeContext, client: NodeClient, session: str,
                         insurer: str) -> None:
    try:
        client.call(operator_node(ctx.topology), OPERATOR_ABANDON,
                    OperatorAbandon(insurer=insurer), params={"session": session})
    except NodeError as exc:  # its session expires anyway
        ctx.log.event("stats_abandon_failed", session=session, error=type(exc).__name__)


def regulator_outcome(
    ctx: NodeContext, insurer: str, session: str, outcome: JoinOutcome
) -> StatsAnswer:
    """Check the released size, relay round 3, record and return the answer."""
    if outcome.session != session:
        raise ProtocolStateError("the outcome is for another session")
    row = _session_row(ctx, session, insurer)
    payload = _payload(insurer, row.query, row.policy, session, row.claimants)
    with ctx.client() as client:
        if outcome.size < row.policy.min_intersection:
            _refuse_session(ctx, client, row, payload, "IntersectionTooSmall")
            raise IntersectionTooSmall(
                f"released size under the agreed minimum of {row.policy.min_intersection}")
        try:
            revealed = client.call(operator_node(ctx.topology), OPERATOR_REVEAL,
                                   OperatorReveal(insurer=insurer, outcome=outcome),
                                   params={"session": session})
        except RemoteError as exc:
            _close(ctx, session, "refused" if exc.http_status < 500 else "failed", None)
            _log_refusal(ctx, payload, exc.error)
            raise
    answer = StatsAnswer(session=session, insurer=insurer, query=row.query, policy=row.policy,
                         status="answered", result=revealed.result, claimants=row.claimants,
                         operator_rows=revealed.operator_rows)
    _close(ctx, session, "answered", answer)
    append_entry(ctx, "query_answered", {
        **payload, "operator_rows": revealed.operator_rows, "answer_sha256": answer.digest(),
    })
    ctx.log.event("stats_answered", party=insurer, session=session,
                  noisy=revealed.result.noisy)
    return answer


def _refuse_session(ctx: NodeContext, client: NodeClient, row: _SessionRow,
                    payload: dict[str, Any], reason: str) -> StatsAnswer:
    answer = StatsAnswer(session=row.session, insurer=row.insurer, query=row.query,
                         policy=row.policy, status="refused", reason=reason,
                         claimants=row.claimants)
    _close(ctx, row.session, "refused", answer)
    _abandon_at_operator(ctx, client, row.session, row.insurer)
    _log_refusal(ctx, payload, reason)
    return answer


def regulator_refusal(ctx: NodeContext, insurer: str, session: str,
                      body: GuardRefusal) -> StatsAnswer:
    """The insurer's IdHolder refused to release: record it, let the operator forget."""
    row = _session_row(ctx, session, insurer)
    payload = _payload(insurer, row.query, row.policy, session, row.claimants)
    with ctx.client() as client:
        return _refuse_session(ctx, client, row, payload, body.reason)


def released_answers(ctx: NodeContext, limit: int = 100) -> list[StatsAnswer]:
    """The regulator's answer book, newest first."""
    with ctx.store.lock:
        rows = ctx.store.conn.execute(
            "SELECT answer FROM stats_sessions WHERE answer IS NOT NULL"
            " ORDER BY updated_at DESC LIMIT ?", (max(1, min(limit, 1000)),)).fetchall()
    return [StatsAnswer.model_validate_json(r[0]) for r in rows]


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, SELF_PAY_JOIN,
           responses={403: {"description": "policy under the floor, or too small"},
                      409: {"description": "noisy query repeated"}})
    def post_join(body: StatsJoin, caller: Caller) -> JoinResponse:
        """Round 1 of the claimants' self-pay statistic: the insurer's keyed claimants."""
        refuse_under_incident(ctx)  # a log under incident answers nothing
        return regulator_join(ctx, caller.name, body)

    @mount(router, SELF_PAY_OUTCOME)
    def post_outcome(session: SessionId, body: JoinOutcome, caller: Caller) -> StatsAnswer:
        """Round 3: the released size and encrypted sum; returns the recorded answer."""
        return regulator_outcome(ctx, caller.name, session, body)

    @mount(router, SELF_PAY_REFUSAL)
    def post_refusal(session: SessionId, body: GuardRefusal, caller: Caller) -> StatsAnswer:
        """The insurer's guard refused to release: recorded as `query_refused`."""
        return regulator_refusal(ctx, caller.name, session, body)

    @mount(router, ANSWERS)
    def get_answers(caller: Caller, limit: int = 100) -> list[StatsAnswer]:
        """Released (and refused) statistics, newest first: the regulator's own view."""
        return released_answers(ctx, limit)

    return [router]


REGULATOR_STATS_SERVICE = Service(
    name="statistics",
    roles=(Role.REGULATOR,),
    routers=_routes,
    components=((COMPONENT, MIGRATIONS),),
)
