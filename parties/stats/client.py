"""The insurer's side of the claimants' self-pay statistic.

The insurer's claimants' national ids never leave it: they become its shared-domain
tokens through the blinded OPRF chain, and only keyed points of those tokens go out.
"""

from collections.abc import Sequence

from mpc.errors import IntersectionTooSmall, MalformedInput
from mpc.psi import IdHolder, IntersectionPolicy
from parties.domains.client import domain_tokens
from parties.runtime.client import NodeClient
from parties.stats.api import (
    DEFAULT_MAX_VALUE,
    MIN_INTERSECTION_FLOOR,
    SCENARIO,
    SELF_PAY_JOIN,
    SELF_PAY_OUTCOME,
    SELF_PAY_REFUSAL,
    GuardRefusal,
    SelfPayQuery,
    StatsAnswer,
    StatsJoin,
    regulator_node,
)


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
    ids = list(dict.fromkeys(national_ids))
    if not ids:
        raise MalformedInput("no claimants")
    policy = IntersectionPolicy(min_intersection=min_intersection, epsilon=epsilon,
                                max_value=max_value)
    tokens = domain_tokens(client, ids, scenario=SCENARIO)
    holder = IdHolder(tokens, policy, with_sum=True)
    regulator = regulator_node(client.topology)
    session = {"session": holder.session}
    response = client.call(regulator, SELF_PAY_JOIN,
                           StatsJoin(query=query, join=holder.request()))
    try:
        outcome = holder.finish(response)
    except IntersectionTooSmall:
        client.call(regulator, SELF_PAY_REFUSAL, GuardRefusal(), params=session)
        raise
    return client.call(regulator, SELF_PAY_OUTCOME, outcome, params=session)
