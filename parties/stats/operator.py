"""The operator's side of the claimants' self-pay statistic: the curator.

The operator holds both sides of the intersection: the people of the insurer's shared
domain with a visit at the hospital (the circulated visits and their domain tokens) and
the insurer's checked claimants (`parties.claims.checked_claimants`, kept from the claim
checks it computed). It intersects them in its own store, draws discrete Laplace noise
for the count and the clipped sum (`parties.stats.noise`), and releases the two noised
integers only when the noised count reaches the minimum group size; otherwise the
uniform `StatisticNotReleased`. The refusal is a function of the noised count alone, so
it is covered by the count's ε.
"""

from fractions import Fraction

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


def noised_release(values: list[int], max_value: int, epsilon: Fraction) -> ReleasedSelfPay:
    """The noised count and sum of `values` (each in [0, max_value]), or
    `StatisticNotReleased` when the noised count is under `MIN_GROUP_SIZE`."""
    released = ReleasedSelfPay(claimants=noised(len(values), 1, epsilon),
                               self_pay_fen=noised(sum(values), max_value, epsilon))
    # The threshold is applied to the noised count, never to the true one: a refusal is
    # then a function of the released (DP) count alone, so whether one person moves the
    # group across the threshold is covered by the same noise as the count itself.
    if released.claimants < MIN_GROUP_SIZE:
        raise StatisticNotReleased("group_too_small")
    return released


def release_self_pay(ctx: NodeContext, body: OperatorSelfPay) -> ReleasedSelfPay:
    """The noised count and clipped sum of the insurer's consented checked claimants with a
    visit at the hospital in the window; `StatisticNotReleased` when the noised count is
    under `MIN_GROUP_SIZE`."""
    hospitals = {n.name for n in ctx.topology.nodes_with_role(Role.HOSPITAL)}
    if body.query.hospital not in hospitals:
        raise UnknownHospital(f"{body.query.hospital!r} is not a hospital of this federation")
    domain_id = live_domain(ctx, SCENARIO, body.insurer)
    claimants = consented_tokens(ctx, body.insurer, domain_id, body.consents_in_force)
    values = self_pay_by_token(ctx, domain_id, body.query, body.max_value)
    matched = [v for t, v in values.items() if t in claimants]
    try:
        released = noised_release(matched, body.max_value, body.epsilon_each())
    except StatisticNotReleased:
        ctx.log.event("stats_not_released", insurer=body.insurer, cause="group_too_small")
        raise
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
