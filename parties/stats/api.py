"""The stats capability's contract: a regulator statistic with guards the querier cannot move.

The statistic: the total self-pay, at one hospital in a window of months, of an insurer's
*checked claimants*, and how many they are, both released with discrete Laplace noise.

    insurer  --SelfPayRequest (contract, query, ε; signed)-->  regulator
      regulator: contract in force with `claimant_self_pay` allowed, quota, the insurer's
      ε budget (persistent accountant; the ε is spent here, before any data is touched),
      the consents in force that the insurer registered for the contract's purpose
               --OperatorSelfPay-->  operator
      operator: the checked claimants with one of those consents (tokens it kept from the
      claim checks it computed, `parties.claims.checked_claimants`) ∩ the people of the
      insurer's shared domain with a visit at the hospital in the window; adds noise to
      the count and the clipped sum; refuses when the noised count is under
      `MIN_GROUP_SIZE`
               <--ReleasedSelfPay (noised count, noised sum)--
      regulator: meter `query_answered`, the answer book
    insurer  <--StatsAnswer--

Who learns what (semi-honest nodes; the insurer may send anything):

- the insurer names no person: its set is the claimants it submitted to real, consented,
  person-bound claim checks. It learns the noised count and sum, or the one refusal
  `StatisticNotReleased` (same status and message whether the group was too small, its
  ε budget was spent or no consent was in force), never the true size. Each query, refused
  or answered once it reached the data, spends its ε: there is no noiseless query and no
  free repeat;
- the operator learns the true size and sum: it holds both sets already (the visits it
  circulates, the tokens it saw in the claim checks' envelopes), so it learns nothing
  new; it is the party that draws the noise and enforces the minimum group size on
  the noised count (a threshold on the true size would let one person's presence flip
  a refusal into a release, outside the noise) (`parties.stats.noise`, from `secrets`);
- the regulator learns the query, the consent ids in force (its own registry) and the
  noised answer; the log carries ids, counters and the SHA-256 of the answer, never
  the statistic, a size or the reason of a data-dependent refusal.

No hospital volume is released: the old `operator_rows` (the operator's row count per
window) is dropped; the noised count is the only size that leaves the operator.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from fractions import Fraction
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from governance.meters import request_document
from mpc.claim.constants import CLAIM_SCENARIO
from parties.runtime.errors import NodeError
from parties.runtime.routes import Kind, Route
from parties.runtime.topology import Role, Topology

SCENARIO = CLAIM_SCENARIO
STATISTIC = "claimant_self_pay"
#: what the statistic reads: a contract and a consent must allow these columns and output
STATISTIC_COLUMNS = ("admission_date", "self_pay_fen")
#: a noised count of checked claimants under this and nothing is released; fixed here,
#: enforced by the operator on the noised count (the querier cannot choose it)
MIN_GROUP_SIZE = 10
#: each claimant's self-pay over the window is clipped here (fen): the sum's sensitivity
DEFAULT_MAX_VALUE = 10_000_000
MAX_VALUE_LIMIT = 100_000_000
#: ε of one query, in thousandths (half for the count, half for the sum)
EPSILON_MILLI_RANGE = (50, 2_000)
#: the ε a data user may spend on statistics, over the federation's life, in thousandths
EPSILON_BUDGET_MILLI = 10_000
MAX_CONSENTS = 500_000
MAX_WINDOW_MONTHS = 12
NOT_RELEASED = "the statistic is not released"

_MONTH = r"^(19|20)\d{2}-(0[1-9]|1[0-2])$"
_NODE = r"^[a-z][a-z0-9-]{0,62}$"
_CONTRACT = r"^[A-Za-z0-9._:-]{3,128}$"


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


class StatisticNotReleased(StatisticsRefused):
    """One refusal, one message, for every cause the querier must not tell apart.

    A noised count of checked claimants under `MIN_GROUP_SIZE` (which no consent in force
    also gives, with high probability), and the insurer's ε budget spent: the first
    depends on people's data, and a distinct answer for the second would tell a refusal
    for size apart from it. The cause stays in the refusing node's log and refusal record
    (`log_detail`).
    """

    def __init__(self, cause: str = "") -> None:
        super().__init__(NOT_RELEASED)
        self.log_detail = cause or None


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


def _epsilon_milli(epsilon: float) -> int:
    milli = round(epsilon * 1000)
    low, high = EPSILON_MILLI_RANGE
    if abs(epsilon * 1000 - milli) > 1e-6:
        raise ValueError("epsilon is given in steps of 0.001")
    if not low <= milli <= high:
        raise ValueError(f"epsilon must be within {low / 1000:g}..{high / 1000:g}")
    return milli


class SelfPayRequest(BaseModel):
    """Insurer -> regulator: the statistic over its checked claimants. No ids, no size, no
    noise: nothing the insurer sends names a person or moves a guard."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    contract_id: Annotated[str, Field(pattern=_CONTRACT)]
    query: SelfPayQuery
    epsilon: Annotated[float, Field(description="ε spent by this query (required)")]
    max_value: Annotated[int, Field(ge=1, le=MAX_VALUE_LIMIT,
                                    description="per-claimant clip of the self-pay, fen")] = \
        DEFAULT_MAX_VALUE

    @model_validator(mode="after")
    def _epsilon_in_range(self) -> SelfPayRequest:
        _epsilon_milli(self.epsilon)
        return self

    @property
    def epsilon_milli(self) -> int:
        return _epsilon_milli(self.epsilon)

    def digest(self) -> str:
        """SHA-256 of the canonical request: what the insurer's request signature covers."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


class OperatorSelfPay(BaseModel):
    """Regulator -> operator: the query for the authenticated insurer, its ε (already
    spent at the regulator) and the insurer's consents in force."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    insurer: Annotated[str, Field(pattern=_NODE)]
    contract_id: Annotated[str, Field(pattern=_CONTRACT)]
    query: SelfPayQuery
    epsilon_milli: Annotated[int, Field(ge=EPSILON_MILLI_RANGE[0], le=EPSILON_MILLI_RANGE[1])]
    max_value: Annotated[int, Field(ge=1, le=MAX_VALUE_LIMIT)]
    consents_in_force: Annotated[list[Annotated[str, Field(max_length=128)]],
                                 Field(max_length=MAX_CONSENTS)]

    def epsilon_each(self) -> Fraction:
        """The ε of each of the two released values (the count and the sum)."""
        return Fraction(self.epsilon_milli, 2000)


class ReleasedSelfPay(BaseModel):
    """Operator -> regulator: the noised count and clipped sum, nothing else."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    claimants: int
    self_pay_fen: int


class StatsAnswer(BaseModel):
    """What the regulator records and returns: the released statistic and its terms."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str
    statistic: Literal["claimant_self_pay"] = STATISTIC
    insurer: str
    contract_id: str
    query: SelfPayQuery
    epsilon: float
    max_value: int
    min_group: int = MIN_GROUP_SIZE
    claimants: int = Field(description="the noised number of checked claimants that matched")
    self_pay_fen: int = Field(description="the noised sum of their clipped self-pay")
    epsilon_spent: float = Field(description="the insurer's ε spent, this query included")
    epsilon_budget: float

    def digest(self) -> str:
        """SHA-256 of the canonical answer: the log commits to it."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def signed_self_pay(log_id: str, insurer: str, body: SelfPayRequest) -> dict[str, Any]:
    """What the insurer signs for a statistic request known to the log as `log_id`."""
    return request_document(SELF_PAY.method, SELF_PAY.path, log_id, body.digest(),
                            body.contract_id, insurer, 1)


# --- routes ------------------------------------------------------------------------------

_INSURERS = (Role.INSURER,)
_REGULATORS = (Role.REGULATOR,)

# At the regulator, called by the insurer (header `X-Cogov-Request-Signature`).
SELF_PAY = Route("POST", "/v1/stats/claimant-self-pay", Kind.STATS, SelfPayRequest,
                 StatsAnswer, roles=_INSURERS, tag="statistics")
# The regulator's own book of answers (query parameter `limit`).
ANSWERS = Route("GET", "/v1/stats/answers", Kind.ADMIN, None, list[StatsAnswer],
                tag="statistics")

# At the operator, called by the regulator.
OPERATOR_SELF_PAY = Route("POST", "/v1/stats/operator/claimant-self-pay", Kind.PRODUCT,
                          OperatorSelfPay, ReleasedSelfPay, roles=_REGULATORS, tag="statistics")
