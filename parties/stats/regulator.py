"""The regulator's side of the claimants' self-pay statistic: the gate, the ε accountant,
the meter and the answer book.

For each request, in this order, before any data is touched: the insurer's signature
over the request (its meter carries it); the contract is in force for this insurer with
`claimant_self_pay` among its allowed outputs and the statistic's columns allowed, and
the query fits its quota (`ContractBook.authorize`); the ε is spent in the insurer's
persistent accountant (`stats_epsilon`). A query that would exceed the budget is refused
before the contract is asked, and changes nothing; a retry of an answered request (same
request id, same body) gets the stored answer and spends nothing. Then the regulator
hands the operator the consents in force that the insurer registered for the contract's
purpose, and the operator answers the noised statistic or the uniform
`StatisticNotReleased`. A refusal from the data keeps its ε spent (a free refusal would
let the insurer probe the group size without cost), and the contract's quota
reservation stays: the query was asked.

Refusals that the insurer must not tell apart (the group too small, the budget spent, no
consent in force) are one `StatisticNotReleased`, same status and message; the log's
`query_refused` names only that, the cause stays in this node's log. Answered queries are
metered (`query_answered` with the insurer's request signature, `governance.meters`), so
`governance.billing` bills them per query; `records_touched` is 0: a true count in the
public log would undo the noise.
"""

import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header

from governance.contracts import ContractError
from governance.meters import meter_fields, request_signature_valid
from parties.agreements.books import consent_registry, contract_book
from parties.claims.api import REQUEST_SIGNATURE_HEADER, RequestIdReused, RequestSignatureInvalid
from parties.ledger.client import append_entry
from parties.ledger.incidents import refuse_under_incident
from parties.runtime.access import Caller
from parties.runtime.context import NodeContext
from parties.runtime.errors import RemoteError
from parties.runtime.mount import mount
from parties.runtime.node_log import current_request_id
from parties.runtime.service import Service
from parties.runtime.topology import Role
from parties.stats.api import (
    ANSWERS,
    EPSILON_BUDGET_MILLI,
    OPERATOR_SELF_PAY,
    SCENARIO,
    SELF_PAY,
    STATISTIC,
    STATISTIC_COLUMNS,
    OperatorSelfPay,
    ReleasedSelfPay,
    SelfPayRequest,
    StatisticNotReleased,
    StatsAnswer,
    UnknownHospital,
    operator_node,
    signed_self_pay,
)

COMPONENT = "statistics"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE stats_sessions (
        session TEXT PRIMARY KEY,
        insurer TEXT NOT NULL,
        statistic TEXT NOT NULL,
        query_key TEXT NOT NULL,
        query TEXT NOT NULL,
        policy TEXT NOT NULL,
        noisy INTEGER NOT NULL,
        claimants INTEGER NOT NULL,
        status TEXT NOT NULL,
        answer TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX stats_sessions_query ON stats_sessions (insurer, statistic, query_key)
    """,
    # The insurer-matched protocol is gone: its sessions (and their exact sizes) with it.
    """
    DROP TABLE stats_sessions;
    CREATE TABLE stats_epsilon (       -- the ε accountant: one row per query that spent ε
        request_id TEXT PRIMARY KEY,
        data_user TEXT NOT NULL,
        statistic TEXT NOT NULL,
        epsilon_milli INTEGER NOT NULL,
        body_sha256 TEXT NOT NULL,     -- the request it was spent for (retries match it)
        spent_at REAL NOT NULL
    );
    CREATE INDEX stats_epsilon_by_user ON stats_epsilon (data_user);
    CREATE TABLE stats_answers (       -- the released answers (this node's admin only)
        request_id TEXT PRIMARY KEY REFERENCES stats_epsilon (request_id),
        answer TEXT NOT NULL,
        answered_at REAL NOT NULL
    )
    """,
)


def _now() -> datetime:
    return datetime.now(UTC)


def epsilon_spent_milli(ctx: NodeContext, data_user: str) -> int:
    with ctx.store.lock:
        return ctx.store.conn.execute(
            "SELECT COALESCE(SUM(epsilon_milli), 0) FROM stats_epsilon WHERE data_user = ?",
            (data_user,)).fetchone()[0]


def stored_answer(ctx: NodeContext, rid: str, data_user: str, body_sha256: str
                  ) -> StatsAnswer | None:
    """The answer already released for this very request (a retry), or None for a new one.

    A request id used for another request, or whose request was refused, is refused."""
    with ctx.store.lock:
        row = ctx.store.conn.execute(
            "SELECT e.data_user, e.body_sha256, a.answer FROM stats_epsilon e LEFT JOIN"
            " stats_answers a ON a.request_id = e.request_id WHERE e.request_id = ?",
            (rid,)).fetchone()
    if row is None:
        return None
    if row[0] != data_user or row[1] != body_sha256 or row[2] is None:
        raise RequestIdReused(f"request id {rid} was already used; use a fresh id")
    return StatsAnswer.model_validate_json(row[2])


def spend_epsilon(ctx: NodeContext, rid: str, data_user: str, milli: int,
                  body_sha256: str) -> int:
    """Spend `milli` of `data_user`'s ε for request `rid`; the total spent after it.

    Refused (`StatisticNotReleased`, nothing written) when it would exceed the budget."""
    with ctx.store.lock, ctx.store.conn as conn:
        if conn.execute("SELECT 1 FROM stats_epsilon WHERE request_id = ?",
                        (rid,)).fetchone():
            raise RequestIdReused(f"request id {rid} is being answered; use a fresh id")
        spent = conn.execute(
            "SELECT COALESCE(SUM(epsilon_milli), 0) FROM stats_epsilon WHERE data_user = ?",
            (data_user,)).fetchone()[0]
        if spent + milli > EPSILON_BUDGET_MILLI:
            raise StatisticNotReleased("epsilon_budget_spent")
        conn.execute("INSERT INTO stats_epsilon VALUES (?, ?, ?, ?, ?, ?)",
                     (rid, data_user, STATISTIC, milli, body_sha256, time.time()))
    return spent + milli


def _refund_epsilon(ctx: NodeContext, rid: str) -> None:
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute("DELETE FROM stats_epsilon WHERE request_id = ?", (rid,))


def _payload(insurer: str, body: SelfPayRequest) -> dict[str, Any]:
    query = body.query
    return {
        "statistic": STATISTIC, "party": insurer, "contract_id": body.contract_id,
        "scenario": SCENARIO, "hospital": query.hospital, "first_month": query.month,
        "last_month": query.last_month, "epsilon": repr(body.epsilon),
        "max_value_fen": body.max_value,
    }


def _log_refusal(ctx: NodeContext, payload: dict[str, Any], exc: Exception) -> None:
    reason = type(exc).__name__
    try:
        append_entry(ctx, "query_refused", {**payload, "reason": reason})
    except Exception as log_exc:  # the refusal stands even if the log is unreachable
        ctx.log.event("refusal_not_logged", error=type(log_exc).__name__)
    ctx.log.event("stats_refused", reason=reason, party=payload["party"],
                  cause=getattr(exc, "log_detail", None))


def regulator_self_pay(ctx: NodeContext, insurer: str, body: SelfPayRequest,
                       signature: str | None) -> StatsAnswer:
    """Check, spend ε, ask the operator, meter, record; the answer."""
    refuse_under_incident(ctx)  # a log under incident answers nothing
    rid = current_request_id.get() or ""
    if signature is None or not request_signature_valid(
            ctx.signing_public_keys()[insurer], signed_self_pay(rid, insurer, body), signature):
        raise RequestSignatureInvalid(
            f"sign the request with {insurer}'s node key ({REQUEST_SIGNATURE_HEADER})")
    payload = _payload(insurer, body)
    hospitals = {n.name for n in ctx.topology.nodes_with_role(Role.HOSPITAL)}
    try:
        if body.query.hospital not in hospitals:
            raise UnknownHospital(f"{body.query.hospital!r} is not a hospital of this federation")
        stored = stored_answer(ctx, rid, insurer, body.digest())
        if stored is not None:  # a retry: the same answer, no ε, no second meter
            ctx.log.event("stats_replayed", party=insurer)
            return stored
        spent = spend_epsilon(ctx, rid, insurer, body.epsilon_milli, body.digest())
        book = contract_book(ctx)
        try:
            book.authorize(body.contract_id, insurer, STATISTIC_COLUMNS, [STATISTIC], _now(), 1,
                           request_id=rid)
            terms = book.get(body.contract_id).terms
        except ContractError:
            _refund_epsilon(ctx, rid)  # refused on the documents: nothing was asked
            raise
    except (ContractError, StatisticNotReleased, UnknownHospital, RequestIdReused) as exc:
        _log_refusal(ctx, payload, exc)
        raise
    consents = consent_registry(ctx).in_force(
        insurer, terms.purpose, _now(), scenario=terms.scenario, columns=STATISTIC_COLUMNS,
        outputs=[STATISTIC])
    with ctx.client() as client:
        try:
            released: ReleasedSelfPay = client.call(
                operator_node(ctx.topology), OPERATOR_SELF_PAY, OperatorSelfPay(
                    insurer=insurer, contract_id=body.contract_id, query=body.query,
                    epsilon_milli=body.epsilon_milli, max_value=body.max_value,
                    consents_in_force=consents))
        except RemoteError as exc:
            _log_refusal(ctx, payload, exc)
            if exc.error == StatisticNotReleased.__name__:
                # The ε stays spent: the query reached the data (see the module's docstring).
                raise StatisticNotReleased("refused by the operator") from None
            _refund_epsilon(ctx, rid)  # refused on the documents, or not computed at all
            raise
    answer = StatsAnswer(
        request_id=rid, insurer=insurer, contract_id=body.contract_id, query=body.query,
        epsilon=body.epsilon, max_value=body.max_value, claimants=released.claimants,
        self_pay_fen=released.self_pay_fen, epsilon_spent=spent / 1000,
        epsilon_budget=EPSILON_BUDGET_MILLI / 1000)
    append_entry(ctx, "query_answered", {
        **payload, "records_touched": 0, "rows_returned": 1, "compute_ms": 0,
        "answer_sha256": answer.digest(),
        **meter_fields(SELF_PAY.method, SELF_PAY.path, body.digest(), signature),
    })
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute("INSERT INTO stats_answers VALUES (?, ?, ?)",
                     (rid, answer.model_dump_json(), time.time()))
    ctx.log.event("stats_answered", party=insurer, epsilon_spent_milli=spent)
    return answer


def released_answers(ctx: NodeContext, limit: int = 100) -> list[StatsAnswer]:
    """The regulator's answer book, newest first."""
    with ctx.store.lock:
        rows = ctx.store.conn.execute(
            "SELECT answer FROM stats_answers ORDER BY answered_at DESC LIMIT ?",
            (max(1, min(limit, 1000)),)).fetchall()
    return [StatsAnswer.model_validate_json(r[0]) for r in rows]


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, SELF_PAY,
           responses={403: {"description": "not released (group, budget or consent), or "
                                           "refused by the contract"}})
    def post_self_pay(body: SelfPayRequest, caller: Caller, signature: Annotated[
            str | None, Header(alias=REQUEST_SIGNATURE_HEADER)] = None) -> StatsAnswer:
        """The claimants' self-pay statistic over the insurer's checked, consented claimants,
        noised by the operator; spends the request's ε."""
        return regulator_self_pay(ctx, caller.name, body, signature)

    @mount(router, ANSWERS)
    def get_answers(caller: Caller, limit: int = 100) -> list[StatsAnswer]:
        """Released statistics, newest first: the regulator's own view."""
        return released_answers(ctx, limit)

    return [router]


REGULATOR_STATS_SERVICE = Service(
    name="statistics",
    roles=(Role.REGULATOR,),
    routers=_routes,
    components=((COMPONENT, MIGRATIONS),),
)
