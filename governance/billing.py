"""Metering, billing and revenue sharing, computed from the log alone.

Every answered query is metered in its `query_answered` entry (records
touched, rows returned, compute ms). Only meters that prove themselves are
billed: appended by the contract's serving node and carrying the data user's
signature over the request (`governance.meters`); any other entry naming the
contract is listed in the statement's `anomalies`, never billed.
`statement()` turns a contract and the log's entries into a monthly
statement whose every line names the log entry indices it was computed
from, so any party holding the log can recompute the bill. Amounts are
integer fen; the total is split into the risk reserve and the parties'
shares by largest remainder, so the parts always sum exactly to the total.
"""

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Group
from rich.table import Table

from governance.contracts import FULL_SPLIT_BP, ContractTerms, QueryMeter
from governance.errors import GovernanceError
from governance.ledger.events import EventKind, LogEntry, sha256_hex
from governance.ledger.signing import PublicKeyLike, canonical_json
from governance.meters import MeterAnomaly, meter_identity, sort_meters

RISK_RESERVE = "risk-reserve"


class MeteringError(GovernanceError):
    """A log entry needed for billing is malformed (the detail names the entry index)."""

    http_status = 422


class BillLine(BaseModel):
    model_config = ConfigDict(frozen=True)

    item: str
    day: date | None
    quantity: int
    unit_fen: int
    amount_fen: int
    entry_indices: tuple[int, ...]


class Share(BaseModel):
    model_config = ConfigDict(frozen=True)

    party: str
    basis_points: int
    amount_fen: int


class Meters(BaseModel):
    queries: int = 0
    records_touched: int = 0
    rows_returned: int = 0
    compute_ms: int = 0


class Statement(BaseModel):
    """One contract's bill for one month."""

    model_config = ConfigDict(frozen=True)

    contract_id: str
    contract_sha256: str
    period: Annotated[str, Field(pattern=r"^\d{4}-(0[1-9]|1[0-2])$")]
    lines: tuple[BillLine, ...]
    meters: Meters
    total_fen: int
    risk_reserve_fen: int
    shares: tuple[Share, ...]
    anomalies: tuple[MeterAnomaly, ...] = ()  # meters that did not prove themselves

    def to_json(self) -> str:
        return canonical_json(self.model_dump(mode="json")).decode()

    def log_payload(self) -> dict[str, Any]:
        """Ids, hashes and the total for a `bill_issued` log entry."""
        return {
            "contract_id": self.contract_id,
            "period": self.period,
            "total_fen": self.total_fen,
            "statement_sha256": sha256_hex(self.to_json()),
        }

    def render(self) -> Group:
        """Rich tables: the bill lines, then the split."""
        lines = Table(title=f"Statement {self.contract_id} · {self.period}")
        for column in ("item", "day", "quantity", "unit (fen)", "amount (fen)", "log entries"):
            lines.add_column(
                column, justify="right" if "fen" in column or column == "quantity" else "left"
            )
        for line in self.lines:
            lines.add_row(
                line.item,
                line.day.isoformat() if line.day else "",
                f"{line.quantity:,}",
                f"{line.unit_fen:,}",
                f"{line.amount_fen:,}",
                _ranges(line.entry_indices),
            )
        lines.add_row("total", "", "", "", f"{self.total_fen:,}", "", style="bold")
        split = Table(title="Revenue split")
        split.add_column("party")
        split.add_column("basis points", justify="right")
        split.add_column("amount (fen)", justify="right")
        split.add_row(RISK_RESERVE, "", f"{self.risk_reserve_fen:,}")
        for share in self.shares:
            split.add_row(share.party, f"{share.basis_points:,}", f"{share.amount_fen:,}")
        if not self.anomalies:
            return Group(lines, split)
        anomalies = Table(title="Meters not billed (anomalies)")
        for column in ("log entry", "request id", "appended by", "reason"):
            anomalies.add_column(column)
        for anomaly in self.anomalies:
            anomalies.add_row(str(anomaly.index), anomaly.request_id, anomaly.actor,
                              anomaly.reason)
        return Group(lines, split, anomalies)


def _ranges(indices: Iterable[int]) -> str:
    """Compact '3-7,12' form of sorted entry indices."""
    parts: list[str] = []
    run: list[int] = []
    for index in sorted(indices):
        if run and index == run[-1] + 1:
            run.append(index)
            continue
        if run:
            parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [index]
    if run:
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(parts)


def split_largest_remainder(total: int, weights: Mapping[str, int]) -> dict[str, int]:
    """Split `total` in proportion to integer `weights`; parts sum exactly to `total`.

    Each part gets the floor of its exact share; the leftover units go one each
    to the largest remainders (ties by name), so no part is off by more than 1.
    """
    if total < 0 or any(w < 0 for w in weights.values()):
        raise ValueError("total and weights must not be negative")
    weight_sum = sum(weights.values())
    if weight_sum == 0:
        if total:
            raise ValueError("cannot split a non-zero total over zero weights")
        return dict.fromkeys(weights, 0)
    parts = {name: total * w // weight_sum for name, w in weights.items()}
    leftover = total - sum(parts.values())
    by_remainder = sorted(weights, key=lambda name: (-(total * weights[name] % weight_sum), name))
    for name in by_remainder[:leftover]:
        parts[name] += 1
    return parts


def _month(period: str, terms: ContractTerms) -> tuple[datetime, datetime]:
    match = re.fullmatch(r"(\d{4})-(0[1-9]|1[0-2])", period)
    if not match:
        raise ValueError(f"period {period!r}: expected YYYY-MM")
    year, month = int(match[1]), int(match[2])
    start = datetime(year, month, 1, tzinfo=terms.timezone)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=terms.timezone)
    return start, end


def _moment_of(timestamp_ms: int) -> datetime:
    return datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)


def _moment(log_entry: LogEntry) -> datetime:
    """When the log integrated the entry (its own clock, not the actor's claim)."""
    return _moment_of(log_entry.time_ms)


def statement(contract: ContractTerms, period: str, log_entries: Iterable[LogEntry],
              serving_node: str, keys: Mapping[str, PublicKeyLike]) -> Statement:
    """The contract's statement for `period` ('YYYY-MM', contract time zone) from log entries.

    Billed: each distinct request answered or package run (deduplicated by
    `meter_identity` over the whole log, billed in the month the log integrated its first
    meter) at the per-query and per-record prices, when its meter proves
    itself (appended by `serving_node`, signed by the data user: `keys` are the
    federation's public signing keys), and the monthly subscription if the
    contract was signed (a `contract_signed` entry) and in service during the
    month; service ends at a `contract_terminated` entry plus the notice period.
    Every other meter naming the contract is reported in `anomalies`.
    """
    start, end = _month(period, contract)
    log_entries = list(log_entries)
    meters, anomalies = sort_meters(log_entries, contract, serving_node, keys)
    signed: list[int] = []
    terminated: list[tuple[int, datetime]] = []
    for log_entry in log_entries:
        event = log_entry.entry.event
        if event.payload.get("contract_id") != contract.contract_id:
            continue
        if event.kind == EventKind.CONTRACT_SIGNED:
            signed.append(log_entry.index)
        elif event.kind == EventKind.CONTRACT_TERMINATED:
            terminated.append((log_entry.index, _moment(log_entry)))
    # Deduplicated over the whole log, not the month: a request is billed once, in the
    # month its first meter was integrated, however far apart its duplicates are.
    answered: dict[tuple[str, str], list[tuple[LogEntry, QueryMeter]]] = {}
    for log_entry in meters:
        try:
            meter = QueryMeter.model_validate(log_entry.entry.event.payload)
        except ValidationError as exc:
            field = ".".join(str(p) for p in exc.errors()[0]["loc"])
            raise MeteringError(
                f"entry {log_entry.index}: meter field {field} invalid") from None
        answered.setdefault(meter_identity(log_entry), []).append((log_entry, meter))

    lines: list[BillLine] = []
    meters = Meters()
    per_day: dict[date, list[tuple[list[int], QueryMeter]]] = defaultdict(list)
    for occurrences in answered.values():
        first, meter = occurrences[0]
        if not start <= _moment(first) < end:
            continue
        per_day[contract.day_of(_moment(first))].append(
            ([log_entry.index for log_entry, _ in occurrences], meter)
        )
        meters.queries += 1
        meters.records_touched += meter.records_touched
        meters.rows_returned += meter.rows_returned
        meters.compute_ms += meter.compute_ms
    price = contract.price
    for day in sorted(per_day):
        queries = per_day[day]
        indices = tuple(sorted(i for found, _ in queries for i in found))
        if price.per_query_fen:
            lines.append(
                BillLine(
                    item="queries answered",
                    day=day,
                    quantity=len(queries),
                    unit_fen=price.per_query_fen,
                    amount_fen=len(queries) * price.per_query_fen,
                    entry_indices=indices,
                )
            )
        if price.per_record_fen:
            records = sum(meter.records_touched for _, meter in queries)
            lines.append(
                BillLine(
                    item="records touched",
                    day=day,
                    quantity=records,
                    unit_fen=price.per_record_fen,
                    amount_fen=records * price.per_record_fen,
                    entry_indices=indices,
                )
            )
    subscription = _subscription_line(contract, start, end, signed, terminated)
    if subscription:
        lines.append(subscription)

    total = sum(line.amount_fen for line in lines)
    weights = {RISK_RESERVE: contract.risk_reserve_bp * FULL_SPLIT_BP}
    for party, bp in contract.revenue_split_bp.items():
        weights[party] = (FULL_SPLIT_BP - contract.risk_reserve_bp) * bp
    parts = split_largest_remainder(total, weights)
    return Statement(
        contract_id=contract.contract_id,
        contract_sha256=contract.sha256(),
        period=period,
        lines=tuple(lines),
        meters=meters,
        total_fen=total,
        risk_reserve_fen=parts.pop(RISK_RESERVE),
        shares=tuple(
            Share(party=p, basis_points=contract.revenue_split_bp[p], amount_fen=parts[p])
            for p in sorted(contract.revenue_split_bp)
        ),
        anomalies=tuple(a for a in anomalies if start <= _moment_of(a.timestamp_ms) < end),
    )


def _subscription_line(
    contract: ContractTerms,
    start: datetime,
    end: datetime,
    signed: list[int],
    terminated: list[tuple[int, datetime]],
) -> BillLine | None:
    fee = contract.price.subscription_fen_per_month
    if not fee or not signed:
        return None
    service_start = contract.validity.not_before
    service_end = contract.validity.not_after
    traced = [signed[0]]
    if terminated:
        index, moment = min(terminated, key=lambda t: t[1])
        service_end = min(service_end, moment + timedelta(days=contract.termination.notice_days))
        traced.append(index)
    if not (service_start < end and start < service_end):
        return None
    return BillLine(
        item="subscription",
        day=None,
        quantity=1,
        unit_fen=fee,
        amount_fen=fee,
        entry_indices=tuple(traced),
    )
