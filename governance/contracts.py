"""Data-use contracts: signed terms, checked deterministically before every query.

A contract document (TOML or JSON, validated on load; errors name the field)
states the parties, scenario and purpose, allowed columns and outputs, daily
quota and check budget per consent, validity window, price, revenue split and
termination terms. Every
party signs the canonical document with its Ed25519 key; the contract is in
force only when all have signed, inside its window, and until a party allowed
to terminate does so (effective at once for service; the notice period only
extends a subscription's billing).

`ContractBook.authorize` is the gate a serving node calls before answering:
it checks everything and reserves the query against the daily quota in one
transaction. The same quota is also computable from the log alone
(`usage_from_log` over the `query_answered` entries that prove themselves:
appended by the serving node, signed by the data user), so any party can recompute
and audit it: the paper's "contract terms as code".
"""

import hashlib
import json
import tomllib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from governance.errors import GovernanceError
from governance.ledger.events import LogEntry
from governance.ledger.signing import (
    PublicKeyLike,
    canonical_json,
    public_key_bytes,
    sign_document,
    verify_document,
)
from governance.ledger.transactions import write_transaction
from governance.meters import MeterAnomaly, meter_identity, sort_meters
from governance.migrations import apply_migrations

if TYPE_CHECKING:
    import sqlite3  # annotations only: the caller opens the connection

CONTRACT_DOMAIN = "cogov-contract-v1"
TERMINATION_DOMAIN = "cogov-contract-termination-v1"
FULL_SPLIT_BP = 10_000
# A few checks a day per consent and hospital: enough to check a claim or two in each mode,
# too few to bisect an amount (each answer halves an interval at best) or scan dates.
DEFAULT_CHECKS_PER_CONSENT_PER_DAY = 3
MAX_CHECKS_PER_CONSENT_PER_DAY = 1_000_000

COMPONENT = "contracts"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE contracts (
        contract_id TEXT PRIMARY KEY,
        terms TEXT NOT NULL,
        terms_sha256 TEXT NOT NULL,
        registered_at TEXT NOT NULL
    );
    CREATE TABLE contract_signatures (
        contract_id TEXT NOT NULL REFERENCES contracts (contract_id),
        party TEXT NOT NULL,
        signature TEXT NOT NULL,
        PRIMARY KEY (contract_id, party)
    );
    CREATE TABLE contract_terminations (
        contract_id TEXT PRIMARY KEY REFERENCES contracts (contract_id),
        party TEXT NOT NULL,
        terminated_at TEXT NOT NULL,
        document TEXT NOT NULL
    );
    CREATE TABLE contract_usage (
        usage_id INTEGER PRIMARY KEY AUTOINCREMENT,
        contract_id TEXT NOT NULL REFERENCES contracts (contract_id),
        party TEXT NOT NULL,
        day TEXT NOT NULL,
        rows INTEGER NOT NULL,
        at TEXT NOT NULL,
        request_id TEXT
    );
    CREATE INDEX contract_usage_by_day ON contract_usage (contract_id, party, day);
    """,
)


class ContractError(GovernanceError):
    """Base of contract errors; a failed authorization is a refusal (403)."""

    http_status = 403


class ContractInvalid(ContractError):
    """The contract document is malformed (the detail names the field)."""

    http_status = 400


class ContractSignatureInvalid(ContractInvalid):
    """A party's signature does not verify, or the signer is not a party."""


class ContractUnknown(ContractError):
    http_status = 404


class ContractConflict(ContractError):
    """Other terms are already registered under this contract id."""

    http_status = 409


class ContractNotSigned(ContractError):
    """Not every party has signed yet."""


class ContractNotYetValid(ContractError):
    pass


class ContractExpired(ContractError):
    pass


class ContractTerminated(ContractError):
    pass


class TerminationNotAllowed(ContractError):
    """The party may not terminate this contract."""


class TerminationBackdated(ContractError):
    """A termination notice dated away from the time it is filed: it takes effect when
    filed, so a notice that claims an earlier (or later) moment is refused."""

    http_status = 400


# How far a notice's own time may lie from the serving node's clock when it is filed.
TERMINATION_CLOCK_SKEW = timedelta(minutes=5)


class PartyNotInContract(ContractError):
    """The requesting node is not a data user of the contract."""


class ColumnNotAllowed(ContractError):
    pass


class OutputNotAllowed(ContractError):
    pass


class QuotaExceeded(ContractError):
    http_status = 429


_Node = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
_Code = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]
_Fen = Annotated[int, Field(ge=0, le=10**12)]


class Quota(BaseModel):
    """Limits per data user per contract day, and the check budget of one consent.

    `checks_per_consent_per_day` bounds how many checks one consent buys at one hospital
    per UTC day, refused or answered: a consent authorizes checking claims, not probing a
    person's records (each check answers at most a few bits, so the budget bounds what
    any sequence of checks can learn). An identical check asked again is answered from the
    serving node's book and costs nothing. Omitted, it is `DEFAULT_CHECKS_PER_CONSENT_PER_DAY`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    queries_per_day: Annotated[int, Field(ge=1)]
    rows_per_query: Annotated[int, Field(ge=1)]
    rows_per_day: Annotated[int, Field(ge=1)]
    checks_per_consent_per_day: Annotated[
        int, Field(strict=True, ge=1, le=MAX_CHECKS_PER_CONSENT_PER_DAY)
    ] = DEFAULT_CHECKS_PER_CONSENT_PER_DAY


class Validity(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    not_before: AwareDatetime
    not_after: AwareDatetime

    @model_validator(mode="after")
    def _ordered(self) -> "Validity":
        if self.not_after <= self.not_before:
            raise ValueError("not_after must be later than not_before")
        return self


class Price(BaseModel):
    """Integer fen (1/100 yuan); components add up."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    per_query_fen: _Fen = 0
    per_record_fen: _Fen = 0
    subscription_fen_per_month: _Fen = 0


class TerminationTerms(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    notice_days: Annotated[int, Field(ge=0, le=365)] = 0
    may_terminate: tuple[_Node, ...]


class ContractTerms(BaseModel):
    """The contract document every party signs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    contract_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{3,128}$")]
    version: Annotated[int, Field(ge=1)] = 1
    parties: Annotated[tuple[_Node, ...], Field(min_length=2)]
    data_users: Annotated[tuple[_Node, ...], Field(min_length=1)]
    scenario: _Code
    purpose: _Code
    allowed_columns: tuple[_Code, ...]
    allowed_outputs: Annotated[tuple[_Code, ...], Field(min_length=1)]
    quota: Quota
    validity: Validity
    price: Price
    revenue_split_bp: dict[_Node, Annotated[int, Field(ge=0, le=FULL_SPLIT_BP)]]
    risk_reserve_bp: Annotated[int, Field(ge=0, le=FULL_SPLIT_BP)] = 0
    termination: TerminationTerms
    utc_offset_minutes: Annotated[int, Field(ge=-720, le=840)] = 480

    @model_validator(mode="after")
    def _consistent(self) -> "ContractTerms":
        parties = set(self.parties)
        if len(parties) != len(self.parties):
            raise ValueError("parties: each party once")
        for field, names in (
            ("data_users", self.data_users),
            ("revenue_split_bp", self.revenue_split_bp),
            ("termination.may_terminate", self.termination.may_terminate),
        ):
            strangers = sorted(set(names) - parties)
            if strangers:
                raise ValueError(f"{field}: {strangers} are not parties")
        total = sum(self.revenue_split_bp.values())
        if total != FULL_SPLIT_BP:
            raise ValueError(f"revenue_split_bp: shares sum to {total}, must be {FULL_SPLIT_BP}")
        if self.quota.rows_per_query > self.quota.rows_per_day:
            raise ValueError("quota: rows_per_query exceeds rows_per_day")
        return self

    @property
    def timezone(self) -> timezone:
        return timezone(timedelta(minutes=self.utc_offset_minutes))

    def day_of(self, moment: datetime) -> date:
        """The contract day (in the contract's time zone) a moment falls in."""
        return moment.astimezone(self.timezone).date()

    def document(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def sha256(self) -> str:
        return hashlib.sha256(canonical_json(self.document())).hexdigest()


def _invalid(exc: ValidationError) -> ContractInvalid:
    error = exc.errors()[0]
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        return ContractInvalid(message)  # a cross-field check names its fields itself
    return ContractInvalid(f"{'.'.join(str(p) for p in error['loc'])}: {message}")


def parse_contract(data: Mapping[str, Any]) -> ContractTerms:
    """Validate contract terms from a mapping; `ContractInvalid` names the field."""
    try:
        return ContractTerms.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None


def load_contract(path: str | Path) -> ContractTerms:
    """Load a contract document from a .toml or .json file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ContractInvalid(f"{path.name}: not valid {path.suffix[1:]}: {exc}") from None
    return parse_contract(data)


class SignedContract(BaseModel):
    """Terms plus the signatures collected so far (party -> hex)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    terms: ContractTerms
    signatures: dict[_Node, Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]] = {}

    @property
    def contract_id(self) -> str:
        return self.terms.contract_id

    def missing_signatures(self) -> list[str]:
        return [p for p in self.terms.parties if p not in self.signatures]

    def log_payload(self) -> dict[str, Any]:
        """Ids and hashes for a `contract_signed` log entry."""
        return {
            "contract_id": self.contract_id,
            "contract_sha256": self.terms.sha256(),
            "parties": list(self.terms.parties),
        }


def sign_contract(
    contract: ContractTerms | SignedContract, party: str, key: Ed25519PrivateKey
) -> SignedContract:
    """Add `party`'s signature over the canonical terms."""
    signed = contract if isinstance(contract, SignedContract) else SignedContract(terms=contract)
    if party not in signed.terms.parties:
        raise ContractSignatureInvalid(f"{party} is not a party to {signed.contract_id}")
    signature = sign_document(key, CONTRACT_DOMAIN, signed.terms.document())
    return signed.model_copy(update={"signatures": {**signed.signatures, party: signature}})


class ContractTermination(BaseModel):
    """A party's signed notice that ends the contract."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    contract_id: str
    party: _Node
    terminated_at: AwareDatetime
    reason: _Code = "notice"
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"signature"})


def terminate_contract(
    contract_id: str,
    party: str,
    terminated_at: datetime,
    key: Ed25519PrivateKey,
    reason: str = "notice",
) -> ContractTermination:
    unsigned = ContractTermination(
        contract_id=contract_id,
        party=party,
        terminated_at=terminated_at,
        reason=reason,
        signature="0" * 128,
    )
    signature = sign_document(key, TERMINATION_DOMAIN, unsigned.body())
    return unsigned.model_copy(update={"signature": signature})


class QueryMeter(BaseModel):
    """The metering payload of a `query_answered` log entry (counters and ids only)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    contract_id: str
    party: str
    records_touched: Annotated[int, Field(ge=0)]
    rows_returned: Annotated[int, Field(ge=0)]
    compute_ms: Annotated[int, Field(ge=0)]

    def payload(self) -> dict[str, Any]:
        return self.model_dump()


@dataclass(frozen=True)
class DailyUsage:
    queries: int
    rows: int
    anomalies: tuple[MeterAnomaly, ...] = ()


@dataclass(frozen=True)
class Authorization:
    """A reserved, allowed query: log its `usage_id` with the answer."""

    contract_id: str
    party: str
    day: date
    usage_id: int
    queries_today: int
    rows_today: int


def usage_from_log(
    log_entries: Iterable[LogEntry], terms: ContractTerms, party: str, day: date,
    serving_node: str, keys: Mapping[str, PublicKeyLike],
) -> DailyUsage:
    """Quota usage of `party` on `day` (the log's integration day), recomputed from
    `query_answered` entries alone: only meters that prove themselves count
    (`governance.meters`), each request once over the whole log; the others are
    `anomalies`."""
    meters, anomalies = sort_meters(log_entries, terms, serving_node, keys)
    queries = rows = 0
    counted: set[tuple[str, str]] = set()
    for log_entry in meters:
        event = log_entry.entry.event
        if event.payload.get("party") != party or meter_identity(log_entry) in counted:
            continue
        counted.add(meter_identity(log_entry))
        moment = datetime.fromtimestamp(log_entry.time_ms / 1000, tz=UTC)  # the log's time
        if terms.day_of(moment) == day:
            queries += 1
            rows += int(event.payload.get("rows_returned", 0))
    return DailyUsage(queries=queries, rows=rows, anomalies=tuple(anomalies))


class ContractBook:
    """A node's store of contracts, signatures, terminations and quota usage."""

    def __init__(self, conn: "sqlite3.Connection", party_keys: Mapping[str, PublicKeyLike]) -> None:
        apply_migrations(conn, COMPONENT, MIGRATIONS)
        self._conn = conn
        self._keys = {name: public_key_bytes(key) for name, key in party_keys.items()}

    def _verify(self, terms: ContractTerms, party: str, signature: str) -> None:
        if party not in terms.parties:
            raise ContractSignatureInvalid(f"{party} is not a party to {terms.contract_id}")
        key = self._keys.get(party)
        if key is None:
            raise ContractSignatureInvalid(f"no public key known for {party}")
        if not verify_document(key, CONTRACT_DOMAIN, terms.document(), signature):
            raise ContractSignatureInvalid(f"{party}'s signature on {terms.contract_id} is invalid")

    def register(self, contract: SignedContract, now: datetime) -> SignedContract:
        """Store a contract and the signatures it carries (all verified); merges with stored."""
        for party, signature in contract.signatures.items():
            self._verify(contract.terms, party, signature)
        with write_transaction(self._conn):
            row = self._conn.execute(
                "SELECT terms_sha256 FROM contracts WHERE contract_id = ?", (contract.contract_id,)
            ).fetchone()
            if row is None:
                self._conn.execute(
                    "INSERT INTO contracts VALUES (?, ?, ?, ?)",
                    (
                        contract.contract_id,
                        contract.terms.model_dump_json(),
                        contract.terms.sha256(),
                        now.isoformat(),
                    ),
                )
            elif row[0] != contract.terms.sha256():
                raise ContractConflict(f"other terms are registered as {contract.contract_id}")
            self._conn.executemany(
                "INSERT OR IGNORE INTO contract_signatures VALUES (?, ?, ?)",
                [(contract.contract_id, p, s) for p, s in contract.signatures.items()],
            )
        return self.get(contract.contract_id)

    def add_signature(self, contract_id: str, party: str, signature: str) -> SignedContract:
        contract = self.get(contract_id)
        self._verify(contract.terms, party, signature)
        with write_transaction(self._conn):
            self._conn.execute(
                "INSERT OR IGNORE INTO contract_signatures VALUES (?, ?, ?)",
                (contract_id, party, signature),
            )
        return self.get(contract_id)

    def get(self, contract_id: str) -> SignedContract:
        row = self._conn.execute(
            "SELECT terms FROM contracts WHERE contract_id = ?", (contract_id,)
        ).fetchone()
        if row is None:
            raise ContractUnknown(f"no contract {contract_id}")
        signatures = dict(
            self._conn.execute(
                "SELECT party, signature FROM contract_signatures WHERE contract_id = ?",
                (contract_id,),
            ).fetchall()
        )
        return SignedContract(
            terms=ContractTerms.model_validate_json(row[0]), signatures=signatures
        )

    def terminated_at(self, contract_id: str) -> datetime | None:
        row = self._conn.execute(
            "SELECT terminated_at FROM contract_terminations WHERE contract_id = ?",
            (contract_id,),
        ).fetchone()
        return None if row is None else datetime.fromisoformat(row[0])

    def terminate(self, termination: ContractTermination, now: datetime) -> datetime:
        """End the contract now; the effective time (a notice dated more than
        `TERMINATION_CLOCK_SKEW` away from `now` is refused: no backdating)."""
        contract = self.get(termination.contract_id)
        terms = contract.terms
        if termination.party not in terms.termination.may_terminate:
            raise TerminationNotAllowed(
                f"{termination.party} may not terminate {terms.contract_id}"
            )
        key = self._keys.get(termination.party)
        if key is None or not verify_document(
            key, TERMINATION_DOMAIN, termination.body(), termination.signature
        ):
            raise ContractSignatureInvalid("termination is not signed by the terminating party")
        if abs(termination.terminated_at - now) > TERMINATION_CLOCK_SKEW:
            raise TerminationBackdated(
                f"the notice is dated {termination.terminated_at.isoformat()}, filed at "
                f"{now.isoformat()}: a termination takes effect when it is filed")
        effective = now
        with write_transaction(self._conn):
            previous = self.terminated_at(terms.contract_id)
            if previous is not None and previous <= effective:
                return previous
            self._conn.execute(
                "INSERT OR REPLACE INTO contract_terminations VALUES (?, ?, ?, ?)",
                (
                    terms.contract_id,
                    termination.party,
                    effective.isoformat(),
                    termination.model_dump_json(),
                ),
            )
        return effective

    def usage(self, contract_id: str, party: str, day: date) -> DailyUsage:
        row = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(rows), 0) FROM contract_usage"
            " WHERE contract_id = ? AND party = ? AND day = ?",
            (contract_id, party, day.isoformat()),
        ).fetchone()
        return DailyUsage(queries=int(row[0]), rows=int(row[1]))

    def authorize(
        self,
        contract_id: str,
        party: str,
        columns: Collection[str],
        outputs: Collection[str],
        now: datetime,
        rows: int,
        *,
        request_id: str | None = None,
    ) -> Authorization:
        """Check every term for this query and reserve it against the quota, atomically."""
        contract = self.get(contract_id)
        terms = contract.terms
        if party not in terms.data_users:
            raise PartyNotInContract(f"{party} is not a data user of {contract_id}")
        missing = contract.missing_signatures()
        if missing:
            raise ContractNotSigned(f"{contract_id} is not signed by {missing}")
        terminated_at = self.terminated_at(contract_id)
        if terminated_at is not None and terminated_at <= now:
            raise ContractTerminated(f"{contract_id} was terminated at {terminated_at}")
        if now < terms.validity.not_before:
            raise ContractNotYetValid(f"{contract_id} starts at {terms.validity.not_before}")
        if now >= terms.validity.not_after:
            raise ContractExpired(f"{contract_id} ended at {terms.validity.not_after}")
        extra = sorted(set(columns) - set(terms.allowed_columns))
        if extra:
            raise ColumnNotAllowed(f"columns {extra} are not allowed by {contract_id}")
        extra = sorted(set(outputs) - set(terms.allowed_outputs))
        if extra:
            raise OutputNotAllowed(f"outputs {extra} are not allowed by {contract_id}")
        if rows < 0:
            raise ContractInvalid("rows: must not be negative")
        quota = terms.quota
        if rows > quota.rows_per_query:
            raise QuotaExceeded(f"{rows} rows exceed {quota.rows_per_query} per query")
        day = terms.day_of(now)
        with write_transaction(self._conn):
            used = self.usage(contract_id, party, day)
            if used.queries + 1 > quota.queries_per_day:
                raise QuotaExceeded(
                    f"{party} used all {quota.queries_per_day} queries of {day} on {contract_id}"
                )
            if used.rows + rows > quota.rows_per_day:
                raise QuotaExceeded(
                    f"{party} would exceed {quota.rows_per_day} rows on {day} on {contract_id}"
                )
            cursor = self._conn.execute(
                "INSERT INTO contract_usage (contract_id, party, day, rows, at, request_id)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (contract_id, party, day.isoformat(), rows, now.isoformat(), request_id),
            )
        return Authorization(
            contract_id=contract_id,
            party=party,
            day=day,
            usage_id=int(cursor.lastrowid),
            queries_today=used.queries + 1,
            rows_today=used.rows + rows,
        )
