"""The regulator's rules on a statistic's policy, checked by the regulator and again by the
operator that holds the values."""

from mpc.errors import MalformedInput
from mpc.psi import IntersectionPolicy
from parties.stats.api import (
    EPSILON_RANGE,
    MAX_VALUE_LIMIT,
    MIN_INTERSECTION_FLOOR,
    PolicyBelowFloor,
)


def check_policy(policy: IntersectionPolicy) -> None:
    """Refuse a policy under the floor, with a clipping bound or a budget out of range."""
    if policy.min_intersection < MIN_INTERSECTION_FLOOR:
        raise PolicyBelowFloor(f"min_intersection {policy.min_intersection} is under the "
                               f"floor of {MIN_INTERSECTION_FLOOR}")
    if not 1 <= policy.max_value <= MAX_VALUE_LIMIT:
        raise MalformedInput(f"max_value must be within 1..{MAX_VALUE_LIMIT} fen")
    low, high = EPSILON_RANGE
    if policy.epsilon is not None and not low <= policy.epsilon <= high:
        raise MalformedInput(f"epsilon must be within {low:g}..{high:g}")
