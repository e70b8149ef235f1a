"""Leak tracing: name the shared domain that leaked xID tokens came from.

Each anonymous shared domain d holds tokens T_d(id) = k2[d]·k1·H(id), and no
two domains share a token (docs/design.md §4). Given tokens found in a leak, the
operator looks them up in every domain's token set; the domain whose tokens
appear is the source. `trace_leak` is the pure function; `read_leaked_tokens`
reads a leaked CSV or Parquet file; `recompute_domain_tokens` rebuilds the
domain sets from level-1 tokens when the operator keeps only those.

Why a handful of tokens suffice. A token encodes a point of a group of prime
order L ≈ 2^252. A token that d did not issue (random noise, another
domain's token, or a forgery made without k2[d]) equals a given one of d's
N tokens with probability at most 1/L, so it matches any of them with
probability at most N/L: with N = 10^9 that is below 2^-222. Among n leaked
tokens, m or more chance matches happen with probability at most
C(n, m)·(N/L)^m. So one match is already overwhelming evidence, and 10 real
tokens hidden among 90 random ones are attributed with certainty for any
practical purpose: the noise cannot produce matches, it only lowers the share.
The report gives each domain's count, its share of the leak and log10 of that
chance bound.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Collection, Container, Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from governance.errors import GovernanceError
from mpc import xid

TOKEN_BYTES = 32
GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493
#: assumed size of a domain given as a lookup without len(): generous, so the bound stays honest
UNKNOWN_DOMAIN_SIZE = 2**40
_TOKEN_COLUMNS = ("xid", "token", "xid_token", "domain_token", "T_d")

#: a domain's tokens: a set (or anything with `in`), or a batch lookup returning the present ones
DomainTokens = Container[bytes] | Callable[[Sequence[bytes]], Collection[bytes]]


class LeakFileError(GovernanceError):
    """A leaked file cannot be read, or holds no token column."""

    http_status = 422


class DomainMatch(BaseModel):
    model_config = ConfigDict(frozen=True)

    domain: str
    matched: int
    share: float
    chance_log10: float  # log10 of an upper bound on P(this many matches by chance)


class LeakReport(BaseModel):
    """Which domains the leaked tokens match, strongest first."""

    model_config = ConfigDict(frozen=True)

    leaked: int  # distinct well-formed tokens examined
    unparseable: int  # entries that are not 32-byte tokens (hex, base64 or raw)
    matches: list[DomainMatch]
    attributed: list[str]  # domains with at least `min_matches` matches
    unmatched: int  # tokens that match no domain (noise, or from outside the federation)

    def summary(self) -> str:
        if not self.attributed:
            return f"none of {self.leaked} leaked tokens matches a known domain"
        return "; ".join(
            f"{m.matched} of {self.leaked} leaked tokens ({m.share:.0%}) match domain "
            f"{m.domain!r} (chance <= 1e{m.chance_log10:.0f})"
            for m in self.matches
            if m.domain in self.attributed
        )


def trace_leak(
    leaked_tokens: Iterable[bytes | str],
    domains: Mapping[str, DomainTokens],
    *,
    min_matches: int = 1,
) -> LeakReport:
    """Match leaked tokens (raw, hex or base64) against each domain's tokens."""
    if min_matches < 1:
        raise ValueError("min_matches must be >= 1")
    tokens, unparseable = _parse_tokens(leaked_tokens)
    n = len(tokens)
    found: dict[str, set[bytes]] = {}
    for domain, lookup in domains.items():
        if callable(lookup) and not hasattr(lookup, "__contains__"):
            found[domain] = set(lookup(tokens)) & set(tokens)
        else:
            found[domain] = {t for t in tokens if t in lookup}
    matches = sorted(
        (
            DomainMatch(
                domain=domain,
                matched=len(hits),
                share=len(hits) / n if n else 0.0,
                chance_log10=_chance_log10(n, len(hits), _domain_size(domains[domain])),
            )
            for domain, hits in found.items()
        ),
        key=lambda m: (-m.matched, m.domain),
    )
    matched_any = set().union(*found.values()) if found else set()
    return LeakReport(
        leaked=n,
        unparseable=unparseable,
        matches=matches,
        attributed=[m.domain for m in matches if m.matched >= min_matches],
        unmatched=n - len(matched_any),
    )


def read_leaked_tokens(path: str | Path, column: str | None = None) -> list[bytes | str]:
    """The token column of a leaked CSV or Parquet file (guessed when not named)."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = pq.read_table(path).to_pandas()
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise LeakFileError(f"cannot read {path.name}: {exc}") from None
    if column is None:
        column = _guess_token_column(frame)
    if column not in frame.columns:
        raise LeakFileError(f"{path.name} has no column {column!r}")
    return [v for v in frame[column].tolist() if isinstance(v, bytes | str)]


def trace_leak_file(
    path: str | Path,
    domains: Mapping[str, DomainTokens],
    *,
    column: str | None = None,
    min_matches: int = 1,
) -> LeakReport:
    return trace_leak(read_leaked_tokens(path, column), domains, min_matches=min_matches)


def recompute_domain_tokens(
    domain_keys: Mapping[str, xid.XidKey],
    level1_tokens: Sequence[bytes],
    *,
    pool: xid.WorkerPool | None = None,
) -> dict[str, set[bytes]]:
    """Each domain's token set, recomputed as k2[d]·P1 from the level-1 tokens."""
    return {d: set(xid.rekey(key, level1_tokens, pool=pool)) for d, key in domain_keys.items()}


# ---------------------------------------------------------------- internals


def _parse_token(value: bytes | str) -> bytes | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value) if len(value) == TOKEN_BYTES else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    try:
        if len(text) == 2 * TOKEN_BYTES:
            return bytes.fromhex(text)
        raw = base64.b64decode(text, validate=True)
        return raw if len(raw) == TOKEN_BYTES else None
    except (ValueError, binascii.Error):
        return None


def _parse_tokens(values: Iterable[bytes | str]) -> tuple[list[bytes], int]:
    tokens: dict[bytes, None] = {}
    bad = 0
    for value in values:
        token = _parse_token(value)
        if token is None:
            bad += 1
        else:
            tokens[token] = None
    return list(tokens), bad


def _guess_token_column(frame: pd.DataFrame) -> str:
    for name in _TOKEN_COLUMNS:
        if name in frame.columns:
            return name
    best, best_share = None, 0.0
    for name in frame.columns:
        sample = frame[name].head(200).tolist()
        share = sum(_parse_token(v) is not None for v in sample) / max(1, len(sample))
        if share > best_share:
            best, best_share = name, share
    if best is None or best_share < 0.5:
        raise LeakFileError("no column of 32-byte tokens found; name it with column=")
    return str(best)


def _domain_size(lookup: DomainTokens) -> int:
    try:
        return max(1, len(lookup))  # type: ignore[arg-type]
    except TypeError:
        return UNKNOWN_DOMAIN_SIZE


def _chance_log10(n: int, m: int, domain_size: int) -> float:
    """log10 of C(n, m)·(N/L)^m, the bound on m or more chance matches (0 when m = 0)."""
    if m == 0:
        return 0.0
    log_binomial = (math.lgamma(n + 1) - math.lgamma(m + 1) - math.lgamma(n - m + 1)) / math.log(10)
    return min(0.0, log_binomial + m * (math.log10(domain_size) - math.log10(GROUP_ORDER)))
