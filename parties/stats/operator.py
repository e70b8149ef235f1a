"""The operator's side of the claimants' self-pay statistic: the value holder.

For each join the regulator relays, the operator keys the insurer's points and keys and
encrypts its own rows: the tokens of the insurer's shared domain whose visit is at the
hospital in the window, valued at that person's self-pay, clipped. It decrypts the
released sum once per session; open sessions live in memory (a restart forgets them).
"""

import threading
import time
from typing import Annotated

from fastapi import APIRouter, Path

from mpc.errors import IntersectionTooSmall, MalformedInput, ProtocolStateError
from mpc.hazmat.parallel import MIN_PARALLEL_ITEMS
from mpc.psi import JoinOutcome, JoinResponse, ValueHolder
from parties.domains.keys import xid_pool
from parties.domains.registry import live_domain
from parties.ingest.circulated import VISITS_TABLE, read_visits
from parties.runtime.access import Caller
from parties.runtime.context import NodeContext
from parties.runtime.mount import mount
from parties.runtime.service import Service
from parties.runtime.topology import Role
from parties.stats.api import (
    OPERATOR_ABANDON,
    OPERATOR_JOIN,
    OPERATOR_REVEAL,
    POINT_BYTES,
    SCENARIO,
    SESSION_PATTERN,
    SESSION_TTL_S,
    Abandoned,
    OperatorAbandon,
    OperatorJoin,
    OperatorReveal,
    Revealed,
    SelfPayQuery,
    TooManySessions,
    UnknownSession,
)
from parties.stats.policy import check_policy

MAX_OPEN_SESSIONS = 64

SessionId = Annotated[str, Path(pattern=SESSION_PATTERN)]


def self_pay_by_token(
    ctx: NodeContext, insurer: str, query: SelfPayQuery, max_value: int
) -> tuple[list[bytes], list[int]]:
    """(shared-domain token, clipped self-pay) of each person of `insurer`'s shared domain
    with a visit at the hospital in the window; the self-pay is summed over that person's
    visits there."""
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

    def add(self, session: str, opened: _OpenSession) -> None:
        with self._lock:
            self._purge()
            if session in self._open:
                raise ProtocolStateError(f"session {session} is already open")
            if len(self._open) >= MAX_OPEN_SESSIONS:
                raise TooManySessions(f"{MAX_OPEN_SESSIONS} statistics sessions are open")
            self._open[session] = opened

    def pop(self, session: str, insurer: str) -> _OpenSession:
        with self._lock:
            self._purge()
            opened = self._open.get(session)
            if opened is None or opened.insurer != insurer:
                raise UnknownSession(f"no open session {session} of {insurer}")
            return self._open.pop(session)

    def _purge(self) -> None:
        now = time.monotonic()
        for sid in [s for s, e in self._open.items() if e.expires < now]:
            del self._open[sid]


def _value_sessions(ctx: NodeContext) -> ValueSessions:
    return ctx.component(ValueSessions, ValueSessions)


def operator_join(ctx: NodeContext, body: OperatorJoin) -> JoinResponse:
    """Round 2 at the operator: key the insurer's points, key and encrypt its own rows."""
    check_policy(body.join.policy)
    if not body.join.with_sum:
        raise MalformedInput("this statistic is a sum")
    tokens, values = self_pay_by_token(ctx, body.insurer, body.query, body.join.policy.max_value)
    if not tokens:
        # Nothing to match: an empty intersection is under any minimum (the floor is >= 1).
        raise IntersectionTooSmall(f"no visits at {body.query.hospital} in the window")
    pool = xid_pool(ctx) if len(tokens) + len(body.join.points) // POINT_BYTES >= \
        MIN_PARALLEL_ITEMS else None
    holder = ValueHolder(tokens, values, body.join.policy, pool=pool)
    response = holder.respond(body.join)
    _value_sessions(ctx).add(body.join.session, _OpenSession(holder, body.insurer, len(tokens)))
    ctx.log.event("stats_joined", insurer=body.insurer, session=body.join.session,
                  rows=len(tokens), claimants=len(body.join.points) // POINT_BYTES)
    return response


def operator_reveal(ctx: NodeContext, insurer: str, outcome: JoinOutcome) -> Revealed:
    opened = _value_sessions(ctx).pop(outcome.session, insurer)
    if outcome.size < opened.holder.policy.min_intersection:
        raise IntersectionTooSmall(
            f"released size under the agreed minimum of {opened.holder.policy.min_intersection}")
    result = opened.holder.reveal(outcome)
    ctx.log.event("stats_revealed", insurer=insurer, session=outcome.session)
    return Revealed(result=result, operator_rows=opened.rows)


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, OPERATOR_JOIN)
    def post_join(body: OperatorJoin, caller: Caller) -> JoinResponse:
        """Key the insurer's points; key and encrypt the self-pay of its shared domain's
        visitors."""
        return operator_join(ctx, body)

    @mount(router, OPERATOR_REVEAL)
    def post_reveal(session: SessionId, body: OperatorReveal, caller: Caller) -> Revealed:
        """Decrypt the released sum of an open session (once)."""
        if body.outcome.session != session:
            raise ProtocolStateError("the outcome is for another session")
        return operator_reveal(ctx, body.insurer, body.outcome)

    @mount(router, OPERATOR_ABANDON)
    def post_abandon(session: SessionId, body: OperatorAbandon, caller: Caller) -> Abandoned:
        """Forget a refused session."""
        try:
            _value_sessions(ctx).pop(session, body.insurer)
        except UnknownSession:
            return Abandoned(session=session, abandoned=False)
        return Abandoned(session=session, abandoned=True)

    return [router]


OPERATOR_STATS_SERVICE = Service(
    name="statistics-values",
    roles=(Role.OPERATOR,),
    routers=_routes,
)
