"""The operator's side of the claimants' self-pay statistic: the curator.

The operator holds both sides of the intersection: the people of the insurer's shared
domain with a visit at the hospital (the circulated visits and their domain tokens) and
the insurer's checked claimants (`parties.claims.checked_claimants`, kept from the claim
checks it computed). It intersects them in its own store, enforces the minimum group size
on the true size, and releases only the count and the clipped sum, each with discrete
Laplace noise it draws (`parties.stats.noise`). Nothing but those two noised integers
leaves it; a too-small group is the uniform `StatisticNotReleased`.
"""

from fastapi import APIRouter

from parties.claims.checked_claimants import consented_tokens
from parties.domains.registry import live_domain
from parties.ingest.circulated import VISITS_TABLE, read_visits
from parties.runtime.access import Caller
from parties.runtime.context import NodeContext
from parties.runtime.mount import mount
from parties.runtime.service import Service
from parties.runtime.topology import Role
from parties.stats.api import (
    MIN_GROUP_SIZE,
    OPERATOR_SELF_PAY,
    SCENARIO,
    OperatorSelfPay,
    ReleasedSelfPay,
    SelfPayQuery,
    StatisticNotReleased,
    UnknownHospital,
)
from parties.stats.noise import noised


def self_pay_by_token(
    ctx: NodeContext, domain_id: str, query: SelfPayQuery, max_value: int
) -> dict[bytes, int]:
    """The clipped self-pay, summed over that person's visits there, of each person of the
    shared domain `domain_id` with a visit at the hospital in the window, by token."""
    with ctx.store.lock:
        refs = [bytes(r) for (r,) in ctx.store.conn.execute(
            f"SELECT visit_ref FROM {VISITS_TABLE} WHERE hospital_id = ?", (query.hospital,))]
    visits = read_visits(ctx, refs) if refs else None
    if visits is None or visits.empty:
        return {}
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
    return {t: min(max(0, v), max_value) for t, v in totals.items()}


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


def release_self_pay(ctx: NodeContext, body: OperatorSelfPay) -> ReleasedSelfPay:
    """The noised count and clipped sum of the insurer's consented checked claimants with a
    visit at the hospital in the window; `StatisticNotReleased` under `MIN_GROUP_SIZE`."""
    hospitals = {n.name for n in ctx.topology.nodes_with_role(Role.HOSPITAL)}
    if body.query.hospital not in hospitals:
        raise UnknownHospital(f"{body.query.hospital!r} is not a hospital of this federation")
    domain_id = live_domain(ctx, SCENARIO, body.insurer)
    claimants = consented_tokens(ctx, body.insurer, domain_id, body.consents_in_force)
    values = self_pay_by_token(ctx, domain_id, body.query, body.max_value)
    matched = [v for t, v in values.items() if t in claimants]
    if len(matched) < MIN_GROUP_SIZE:
        ctx.log.event("stats_not_released", insurer=body.insurer, cause="group_too_small")
        raise StatisticNotReleased("group_too_small")
    epsilon = body.epsilon_each()
    released = ReleasedSelfPay(claimants=noised(len(matched), 1, epsilon),
                               self_pay_fen=noised(sum(matched), body.max_value, epsilon))
    ctx.log.event("stats_released", insurer=body.insurer, epsilon_milli=body.epsilon_milli)
    return released


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, OPERATOR_SELF_PAY)
    def post_self_pay(body: OperatorSelfPay, caller: Caller) -> ReleasedSelfPay:
        """The noised self-pay statistic over the insurer's consented checked claimants."""
        return release_self_pay(ctx, body)

    return [router]


OPERATOR_STATS_SERVICE = Service(
    name="statistics-values",
    roles=(Role.OPERATOR,),
    routers=_routes,
)
