"""The stats capability's contract: the regulator's statistics on private intersection-sum.

The example statistic: the total self-pay of an insurer's claimants at one hospital in
one month (or a window of months), and how many of them were there. Nobody learns
which claimants matched.

    insurer (IdHolder on its claimants' shared-domain tokens, from the OPRF chain)
      1. JoinRequest  --stats-->  regulator (checks the query and its policy)
                                  --product-->  operator (ValueHolder on the tokens of
                                  the insurer's shared domain whose visit is at the hospital
                                  in the window, value = that person's self-pay, clipped)
      2. JoinResponse <-- regulator <-- operator
      3. insurer matches, enforces the minimum size, sums under the operator's ElGamal key
         JoinOutcome  --stats-->  regulator (checks the size again)  --product--> operator
      4. operator decrypts: IntersectionResult  -->  regulator (records it)  -->  insurer

The regulator is the consumer: it keeps every released answer (`ANSWERS`, its local
administrator only) and appends `query_answered` to the log with ids, counters and the
SHA-256 of the answer, not the statistic itself (every party reads the log). A refusal
(intersection under the minimum, policy under the regulator's floor, a noisy query
repeated, an unknown hospital, the operator's refusal) is logged as `query_refused`.
When the insurer's `IdHolder` refuses (the released size is under the minimum) it
reports the refusal, which the regulator logs and the operator forgets.

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
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mpc.claim.constants import CLAIM_SCENARIO
from mpc.psi import IntersectionPolicy, IntersectionResult, JoinOutcome, JoinRequest, JoinResponse
from parties.runtime.errors import NodeError
from parties.runtime.routes import Kind, Route
from parties.runtime.topology import Role, Topology

SCENARIO = CLAIM_SCENARIO
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
#: a join's session closes this long after it opened (at the regulator and the operator)
SESSION_TTL_S = 600.0
SESSION_PATTERN = r"^[0-9a-f]{32}$"
POINT_BYTES = 32

_MONTH = r"^(19|20)\d{2}-(0[1-9]|1[0-2])$"
_NODE = r"^[a-z][a-z0-9-]{0,62}$"


def regulator_node(topology: Topology) -> str:
    return topology.node_of(Role.REGULATOR)


def operator_node(topology: Topology) -> str:
    return topology.node_of(Role.OPERATOR)


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


def _month_index(month: str) -> int:
    """Months since year 0 of a 'YYYY-MM' month."""
    year, m = month.split("-")
    return int(year) * 12 + int(m) - 1


class SelfPayQuery(BaseModel):
    """Which visits count: at `hospital`, admitted in the months `month`..`through`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hospital: Annotated[str, Field(pattern=_NODE)]
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

    insurer: Annotated[str, Field(pattern=_NODE)]
    query: SelfPayQuery
    join: JoinRequest


class GuardRefusal(BaseModel):
    """The insurer's report that its IdHolder refused to release (size under the minimum)."""

    model_config = ConfigDict(extra="forbid")

    reason: Literal["IntersectionTooSmall"] = "IntersectionTooSmall"


class OperatorReveal(BaseModel):
    """Round 3, regulator -> operator: the insurer's outcome of a session to decrypt."""

    model_config = ConfigDict(extra="forbid")

    insurer: Annotated[str, Field(pattern=_NODE)]
    outcome: JoinOutcome


class OperatorAbandon(BaseModel):
    model_config = ConfigDict(extra="forbid")

    insurer: Annotated[str, Field(pattern=_NODE)]


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


# --- routes ------------------------------------------------------------------------------

_INSURERS = (Role.INSURER,)
_REGULATORS = (Role.REGULATOR,)

# At the regulator, called by the insurer (path parameter `session`: the join's session).
SELF_PAY_JOIN = Route("POST", "/v1/stats/claimant-self-pay", Kind.STATS, StatsJoin,
                      JoinResponse, roles=_INSURERS, tag="statistics")
SELF_PAY_OUTCOME = Route("POST", "/v1/stats/claimant-self-pay/{session}/outcome", Kind.STATS,
                         JoinOutcome, StatsAnswer, roles=_INSURERS, tag="statistics")
SELF_PAY_REFUSAL = Route("POST", "/v1/stats/claimant-self-pay/{session}/refusal", Kind.STATS,
                         GuardRefusal, StatsAnswer, roles=_INSURERS, tag="statistics")
# The regulator's own book of answers (query parameter `limit`).
ANSWERS = Route("GET", "/v1/stats/answers", Kind.ADMIN, None, list[StatsAnswer],
                tag="statistics")

# At the operator, called by the regulator.
OPERATOR_JOIN = Route("POST", "/v1/stats/operator/claimant-self-pay/join", Kind.PRODUCT,
                      OperatorJoin, JoinResponse, roles=_REGULATORS, tag="statistics")
OPERATOR_REVEAL = Route("POST", "/v1/stats/operator/claimant-self-pay/{session}/reveal",
                        Kind.PRODUCT, OperatorReveal, Revealed, roles=_REGULATORS,
                        tag="statistics")
OPERATOR_ABANDON = Route("POST", "/v1/stats/operator/claimant-self-pay/{session}/abandon",
                         Kind.PRODUCT, OperatorAbandon, Abandoned, roles=_REGULATORS,
                         tag="statistics")
