"""The regulator's statistics on private intersection-sum (issue 8).

The example statistic: the total self-pay of an insurer's claimants at one hospital in
one month (or a window of months), and how many of them were there. Nobody learns
which claimants matched.

    insurer (IdHolder on its claimants' domain tokens, from the OPRF chain)
      1. JoinRequest  --stats-->  regulator (checks the query and its policy)
                                  --product-->  operator (ValueHolder on the tokens of
                                  the insurer's domain whose visit is at the hospital in
                                  the window, value = that person's self-pay, clipped)
      2. JoinResponse <-- regulator <-- operator
      3. insurer matches, enforces the minimum size, sums under the operator's ElGamal key
         JoinOutcome  --stats-->  regulator (checks the size again)  --product--> operator
      4. operator decrypts: IntersectionResult  -->  regulator (records it)  -->  insurer

The regulator is the consumer: it keeps every released answer (`GET /v1/stats/answers`,
its local operator only) and appends `query_answered` to the log with ids, counters
and the SHA-256 of the answer, not the statistic itself (every party reads the log).
A refusal (intersection under the minimum, policy under the regulator's floor, a noisy
query repeated, an unknown hospital, the operator's refusal) is logged as
`query_refused`. When the insurer's `IdHolder` refuses (the released size is under the
minimum) it reports the refusal, which the regulator logs and the operator forgets.

Leakage, semi-honest parties (see `mpc.psi`): the insurer learns the number of the
operator's rows and the exact intersection size; the operator learns the number of
claimants, the released size and sum; the regulator learns what is released. A noisy
answer for a (insurer, hospital, window) is released once: fresh noise on a repeat
would let the regulator average it away.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mpc.errors import IntersectionTooSmall, MalformedInput, ProtocolStateError
from mpc.hazmat.parallel import MIN_PARALLEL_ITEMS
from mpc.psi import (
    IdHolder,
    IntersectionPolicy,
    IntersectionResult,
    JoinOutcome,
    JoinRequest,
    JoinResponse,
    ValueHolder,
)
from parties.runtime.access import Caller, CallerPolicy
from parties.runtime.client import NodeClient
from parties.runtime.context import NodeContext
from parties.runtime.errors import NodeError, RemoteError
from parties.runtime.service import Service
from parties.runtime.topology import Role, Topology

SCENARIO = "claim_check"
STATISTIC = "claimant_self_pay"
#: the regulator's floor on the minimum intersection size (refuse policies below it)
MIN_INTERSECTION_FLOOR = IntersectionPolicy().min_intersection
#: each claimant's self-pay over the window is clipped here (fen): it bounds the DP
#: sensitivity and the ElGamal range
DEFAULT_MAX_VALUE = 10_000_000
MAX_VALUE_LIMIT = 100_000_000
MAX_CLAIMANTS = 100_000
EPSILON_RANGE = (0.01, 100.0)
MAX_WINDOW_MONTHS = 12
SESSION_TTL_S = 600.0
MAX_OPEN_SESSIONS = 64
QUERY_PATH = "/v1/stats/claimant-self-pay"
OPERATOR_PATH = "/v1/stats/operator/claimant-self-pay"

_MONTH = r"^(19|20)\d{2}-(0[1-9]|1[0-2])$"
_SESSION = r"^[0-9a-f]{32}$"
_POINT = 32


# --- typed errors ---------------------------------------------------------------------


class StatisticsRefused(NodeError):
    """Base of the statistics service's own refusals."""

    http_status = 403


class UnknownHospital(StatisticsRefused):
    http_status = 422


class PolicyBelowFloor(StatisticsRefused):
    """The query asks for a minimum intersection under the regulator's floor."""


class NoisyQueryRepeated(StatisticsRefused):
    """A noisy answer for this insurer, hospital and window was already released."""

    http_status = 409


class UnknownSession(StatisticsRefused):
    """No open session of this caller under that id (never opened, expired or finished)."""

    http_status = 404


class TooManySessions(StatisticsRefused):
    http_status = 429


# --- messages ----------------------------------------------------------------------------


class SelfPayQuery(BaseModel):
    """Which visits count: at `hospital`, admitted in the months `month`..`through`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hospital: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")]
    month: Annotated[str, Field(pattern=_MONTH, description="first month, YYYY-MM")]
    through: Annotated[str | None, Field(pattern=_MONTH,
                                         description="last month (default: `month`)")] = None

    @model_validator(mode="after")
    def _window_is_ordered(self) -> SelfPayQuery:
        first, last = _month_index(self.month), _month_index(self.last_month)
        if last < first:
            raise ValueError("`through` is before `month`")
        if last - first >= MAX_WINDOW_MONTHS:
            raise ValueError(f"a window spans at most {MAX_WINDOW_MONTHS} months")
        return self

    @property
    def last_month(self) -> str:
        return self.through or self.month

    def window(self) -> tuple[dt.date, dt.date]:
        """[first day of `month`, first day after `through`)."""
        first, last = _month_index(self.month), _month_index(self.last_month) + 1
        return (dt.date(first // 12, first % 12 + 1, 1), dt.date(last // 12, last % 12 + 1, 1))


class StatsJoin(BaseModel):
    """Round 1, insurer -> regulator."""

    model_config = ConfigDict(extra="forbid")

    query: SelfPayQuery
    join: JoinRequest


class OperatorJoin(BaseModel):
    """Round 1, regulator -> operator: the same, naming the authenticated insurer."""

    model_config = ConfigDict(extra="forbid")

    insurer: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")]
    query: SelfPayQuery
    join: JoinRequest


class GuardRefusal(BaseModel):
    """The insurer's report that its IdHolder refused to release (size under the minimum)."""

    model_config = ConfigDict(extra="forbid")

    reason: Literal["IntersectionTooSmall"] = "IntersectionTooSmall"


class Revealed(BaseModel):
    result: IntersectionResult
    operator_rows: int


class Abandoned(BaseModel):
    session: str
    abandoned: bool


class StatsAnswer(BaseModel):
    """What the regulator records and returns: the released statistic and its terms."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    session: str
    statistic: Literal["claimant_self_pay"] = STATISTIC
    insurer: str
    query: SelfPayQuery
    policy: IntersectionPolicy
    status: Literal["answered", "refused"]
    result: IntersectionResult | None = None
    reason: str | None = None
    claimants: int
    operator_rows: int | None = None

    def digest(self) -> str:
        """SHA-256 of the canonical answer: the log commits to it."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


SessionId = Annotated[str, Path(pattern=_SESSION)]


# --- the insurer's side -------------------------------------------------------------------


def claimant_self_pay(
    client: NodeClient,
    national_ids: Sequence[str],
    query: SelfPayQuery,
    *,
    epsilon: float | None = None,
    max_value: int = DEFAULT_MAX_VALUE,
    min_intersection: int = MIN_INTERSECTION_FLOOR,
) -> StatsAnswer:
    """Run the statistic as the insurer holding `client`'s certificate; the regulator's answer.

    Raises `IntersectionTooSmall` when the released size is under the minimum (the
    refusal is reported to the regulator first), `RemoteError` for the nodes' refusals.
    """
    from parties.domains.client import domain_tokens

    ids = list(dict.fromkeys(national_ids))
    if not ids:
        raise MalformedInput("no claimants")
    policy = IntersectionPolicy(min_intersection=min_intersection, epsilon=epsilon,
                                max_value=max_value)
    tokens = domain_tokens(client, ids, scenario=SCENARIO)
    holder = IdHolder(tokens, policy, with_sum=True)
    regulator = _regulator(client.topology)
    body = StatsJoin(query=query, join=holder.request())
    response = JoinResponse.model_validate_json(
        client.post(regulator, QUERY_PATH, kind="stats",
                    json=body.model_dump(mode="json")).content)
    try:
        outcome = holder.finish(response)
    except IntersectionTooSmall:
        client.post(regulator, f"{QUERY_PATH}/{holder.session}/refusal", kind="stats",
                    json=GuardRefusal().model_dump())
        raise
    answer = client.post(regulator, f"{QUERY_PATH}/{holder.session}/outcome", kind="stats",
                         json=outcome.model_dump(mode="json"))
    return StatsAnswer.model_validate_json(answer.content)


# --- the operator's side: the value holder --------------------------------------------------


def self_pay_by_token(
    ctx: NodeContext, insurer: str, query: SelfPayQuery, max_value: int
) -> tuple[list[bytes], list[int]]:
    """(domain token, clipped self-pay) of each person of `insurer`'s domain with a visit at
    the hospital in the window; the self-pay is summed over that person's visits there."""
    from parties.domains.registry import live_domain
    from parties.ingest.circulation import VISITS_TABLE, read_visits

    domain_id = live_domain(ctx, SCENARIO, insurer)
    with ctx.store.lock:
        refs = [bytes(r) for (r,) in ctx.store.conn.execute(
            f"SELECT visit_ref FROM {VISITS_TABLE} WHERE hospital_id = ?", (query.hospital,))]
    visits = read_visits(ctx, refs) if refs else None
    if visits is None or visits.empty:
        return [], []
    start, end = query.window()
    dates = visits["admission_date"]
    visits = visits[[d is not None and start <= d < end for d in dates]]
    token_of = _tokens_of_visits(ctx, domain_id, visits["visit_ref"].tolist())
    totals: dict[bytes, int] = {}
    for ref, fen in zip(visits["visit_ref"], visits["self_pay_fen"], strict=True):
        token = token_of.get(bytes(ref))
        if token is None or fen is None or fen != fen:  # missing (None or NaN)
            continue
        totals[token] = totals.get(token, 0) + int(fen)
    return list(totals), [min(max(0, v), max_value) for v in totals.values()]


def _tokens_of_visits(ctx: NodeContext, domain_id: str, refs: list[bytes]) -> dict[bytes, bytes]:
    found: dict[bytes, bytes] = {}
    with ctx.store.lock:
        for start in range(0, len(refs), 500):
            part = refs[start:start + 500]
            rows = ctx.store.conn.execute(
                "SELECT visit_ref, token FROM domain_tokens WHERE domain_id = ? AND visit_ref IN "
                f"({', '.join('?' * len(part))})", (domain_id, *part)).fetchall()
            found.update((bytes(r), bytes(t)) for r, t in rows)
    return found


class _OpenSession:
    def __init__(self, holder: ValueHolder, insurer: str, rows: int) -> None:
        self.holder, self.insurer, self.rows = holder, insurer, rows
        self.expires = time.monotonic() + SESSION_TTL_S


class ValueSessions:
    """The operator's open value-holder sessions, in memory (a restart forgets them)."""

    def __init__(self) -> None:
        self._open: dict[str, _OpenSession] = {}
        self._lock = threading.Lock()

    def add(self, session: str, entry: _OpenSession) -> None:
        with self._lock:
            self._purge()
            if session in self._open:
                raise ProtocolStateError(f"session {session} is already open")
            if len(self._open) >= MAX_OPEN_SESSIONS:
                raise TooManySessions(f"{MAX_OPEN_SESSIONS} statistics sessions are open")
            self._open[session] = entry

    def pop(self, session: str, insurer: str) -> _OpenSession:
        with self._lock:
            self._purge()
            entry = self._open.get(session)
            if entry is None or entry.insurer != insurer:
                raise UnknownSession(f"no open session {session} of {insurer}")
            return self._open.pop(session)

    def _purge(self) -> None:
        now = time.monotonic()
        for sid in [s for s, e in self._open.items() if e.expires < now]:
            del self._open[sid]


def _value_sessions(ctx: NodeContext) -> ValueSessions:
    return ctx.component(ValueSessions, ValueSessions)


def check_policy(policy: IntersectionPolicy) -> None:
    """The regulator's rules on a statistic's policy (checked by regulator and operator)."""
    if policy.min_intersection < MIN_INTERSECTION_FLOOR:
        raise PolicyBelowFloor(f"min_intersection {policy.min_intersection} is under the "
                               f"floor of {MIN_INTERSECTION_FLOOR}")
    if not 1 <= policy.max_value <= MAX_VALUE_LIMIT:
        raise MalformedInput(f"max_value must be within 1..{MAX_VALUE_LIMIT} fen")
    low, high = EPSILON_RANGE
    if policy.epsilon is not None and not low <= policy.epsilon <= high:
        raise MalformedInput(f"epsilon must be within {low:g}..{high:g}")


def operator_join(ctx: NodeContext, body: OperatorJoin) -> JoinResponse:
    """Round 2 at the operator: key the insurer's points, key and encrypt its own rows."""
    from parties.domains.keys import xid_pool

    check_policy(body.join.policy)
    if not body.join.with_sum:
        raise MalformedInput("this statistic is a sum")
    tokens, values = self_pay_by_token(ctx, body.insurer, body.query, body.join.policy.max_value)
    if not tokens:
        # Nothing to match: an empty intersection is under any minimum (the floor is >= 1).
        raise IntersectionTooSmall(f"no visits at {body.query.hospital} in the window")
    pool = xid_pool(ctx) if len(tokens) + len(body.join.points) // _POINT >= \
        MIN_PARALLEL_ITEMS else None
    holder = ValueHolder(tokens, values, body.join.policy, pool=pool)
    response = holder.respond(body.join)
    _value_sessions(ctx).add(body.join.session, _OpenSession(holder, body.insurer, len(tokens)))
    ctx.log.event("stats_joined", insurer=body.insurer, session=body.join.session,
                  rows=len(tokens), claimants=len(body.join.points) // _POINT)
    return response


def operator_reveal(ctx: NodeContext, insurer: str, outcome: JoinOutcome) -> Revealed:
    entry = _value_sessions(ctx).pop(outcome.session, insurer)
    if outcome.size < entry.holder.policy.min_intersection:
        raise IntersectionTooSmall(
            f"released size under the agreed minimum of {entry.holder.policy.min_intersection}")
    result = entry.holder.reveal(outcome)
    ctx.log.event("stats_revealed", insurer=insurer, session=outcome.session)
    return Revealed(result=result, operator_rows=entry.rows)


# --- the regulator's side: checks, relay, the answer book ----------------------------------

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


def _regulator(topology: Topology) -> str:
    return topology.nodes_with_role(Role.REGULATOR)[0].name


def _operator(topology: Topology) -> str:
    return topology.nodes_with_role(Role.OPERATOR)[0].name


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
    from parties.services.ledger import record_event

    try:
        record_event(ctx, "query_refused", {**payload, "reason": reason})
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


def regulator_join(
    ctx: NodeContext, insurer: str, body: StatsJoin
) -> JoinResponse | JSONResponse:
    """Check the query, relay round 1 to the operator, open the session once it answered.

    A refused join leaves no row behind (the refusal is in the log).
    """
    query, join = body.query, body.join
    claimants = len(join.points) // _POINT
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
            response = client.post(_operator(ctx.topology), f"{OPERATOR_PATH}/join",
                                   kind="product", json=OperatorJoin(
                                       insurer=insurer, query=query, join=join,
                                   ).model_dump(mode="json"))
        except RemoteError as exc:
            # The operator's typed refusal (UnknownDomain, IntersectionTooSmall...) as is.
            _log_refusal(ctx, payload, exc.error)
            return JSONResponse({"error": exc.error, "detail": f"operator: {exc.detail}"},
                                status_code=exc.http_status)
        try:
            # Checked again: a concurrent noisy join of the same query may have come first.
            _open_session(ctx, insurer, query, join, claimants, check_only=False)
        except (StatisticsRefused, ProtocolStateError) as exc:
            _abandon_at_operator(ctx, client, join.session, insurer)
            _log_refusal(ctx, payload, type(exc).__name__)
            raise
    ctx.log.event("stats_relayed", party=insurer, session=join.session, claimants=claimants)
    return JoinResponse.model_validate_json(response.content)


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
        client.post(_operator(ctx.topology), f"{OPERATOR_PATH}/{session}/abandon",
                    kind="product", json={"insurer": insurer})
    except NodeError as exc:  # its session expires anyway
        ctx.log.event("stats_abandon_failed", session=session, error=type(exc).__name__)


def regulator_outcome(
    ctx: NodeContext, insurer: str, session: str, outcome: JoinOutcome
) -> StatsAnswer | JSONResponse:
    """Check the released size, relay round 3, record and return the answer."""
    from parties.services.ledger import record_event

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
            revealed = Revealed.model_validate_json(client.post(
                _operator(ctx.topology), f"{OPERATOR_PATH}/{session}/reveal", kind="product",
                json={"insurer": insurer, "outcome": outcome.model_dump(mode="json")},
            ).content)
        except RemoteError as exc:
            _close(ctx, session, "refused" if exc.http_status < 500 else "failed", None)
            _log_refusal(ctx, payload, exc.error)
            return JSONResponse({"error": exc.error, "detail": f"operator: {exc.detail}"},
                                status_code=exc.http_status)
    answer = StatsAnswer(session=session, insurer=insurer, query=row.query, policy=row.policy,
                         status="answered", result=revealed.result, claimants=row.claimants,
                         operator_rows=revealed.operator_rows)
    _close(ctx, session, "answered", answer)
    record_event(ctx, "query_answered", {
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


# --- routes ---------------------------------------------------------------------------------


class OperatorReveal(BaseModel):
    model_config = ConfigDict(extra="forbid")

    insurer: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")]
    outcome: JoinOutcome


class OperatorAbandon(BaseModel):
    model_config = ConfigDict(extra="forbid")

    insurer: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")]


def _regulator_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter(prefix="/v1/stats", tags=["statistics"])
    insurers = CallerPolicy("stats", (Role.INSURER,))

    @router.post("/claimant-self-pay", response_model=JoinResponse,
                 responses={403: {"description": "policy under the floor, or too small"},
                            409: {"description": "noisy query repeated"}})
    def post_join(body: StatsJoin, caller: Caller = Depends(insurers)) -> Any:
        """Round 1 of the claimants' self-pay statistic: the insurer's keyed claimants."""
        return regulator_join(ctx, caller.name, body)

    @router.post("/claimant-self-pay/{session}/outcome", response_model=StatsAnswer)
    def post_outcome(session: SessionId, body: JoinOutcome,
                     caller: Caller = Depends(insurers)) -> Any:
        """Round 3: the released size and encrypted sum; returns the recorded answer."""
        return regulator_outcome(ctx, caller.name, session, body)

    @router.post("/claimant-self-pay/{session}/refusal", response_model=StatsAnswer)
    def post_refusal(session: SessionId, body: GuardRefusal,
                     caller: Caller = Depends(insurers)) -> StatsAnswer:
        """The insurer's guard refused to release: recorded as `query_refused`."""
        return regulator_refusal(ctx, caller.name, session, body)

    @router.get("/answers", response_model=list[StatsAnswer])
    def get_answers(limit: int = 100,
                    caller: Caller = Depends(CallerPolicy("admin"))) -> list[StatsAnswer]:
        """Released (and refused) statistics, newest first: the regulator's own view."""
        return released_answers(ctx, limit)

    return [router]


def _operator_routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter(prefix="/v1/stats/operator", tags=["statistics"])
    regulator = CallerPolicy("product", (Role.REGULATOR,))

    @router.post("/claimant-self-pay/join", response_model=JoinResponse)
    def post_join(body: OperatorJoin, caller: Caller = Depends(regulator)) -> JoinResponse:
        """Key the insurer's points; key and encrypt the self-pay of its domain's visitors."""
        return operator_join(ctx, body)

    @router.post("/claimant-self-pay/{session}/reveal", response_model=Revealed)
    def post_reveal(session: SessionId, body: OperatorReveal,
                    caller: Caller = Depends(regulator)) -> Revealed:
        """Decrypt the released sum of an open session (once)."""
        if body.outcome.session != session:
            raise ProtocolStateError("the outcome is for another session")
        return operator_reveal(ctx, body.insurer, body.outcome)

    @router.post("/claimant-self-pay/{session}/abandon", response_model=Abandoned)
    def post_abandon(session: SessionId, body: OperatorAbandon,
                     caller: Caller = Depends(regulator)) -> Abandoned:
        """Forget a refused session."""
        try:
            _value_sessions(ctx).pop(session, body.insurer)
        except UnknownSession:
            return Abandoned(session=session, abandoned=False)
        return Abandoned(session=session, abandoned=True)

    return [router]


# --- helpers --------------------------------------------------------------------------------


def _month_index(month: str) -> int:
    year, m = month.split("-")
    return int(year) * 12 + int(m) - 1


REGULATOR_STATS_SERVICE = Service(
    name="statistics",
    roles=(Role.REGULATOR,),
    routers=_regulator_routes,
    components=((COMPONENT, MIGRATIONS),),
)

OPERATOR_STATS_SERVICE = Service(
    name="statistics-values",
    roles=(Role.OPERATOR,),
    routers=_operator_routes,
)
