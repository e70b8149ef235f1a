"""The data owner's development libraries, built from its authorized data.

The health authority holds the authorized data (the governed visits in its store,
sealed at rest). From it, it builds per dataset
- the **sample** library: synthetic rows drawn from the data's marginals and pairwise
  correlations (`governance.synthetic.synthesize`), with its fidelity and privacy report;
- the **test** library: a small random sample masked by the grading rules;
and publishes both to the operator's development environment. The **authorized**
library is built per production run (`parties.secure_room.approval`) and never leaves.

Every library replaces direct identifiers by pseudonyms under a fresh random key
(national id -> HMAC of the level-1 token p1, visit id -> HMAC of the visit ref), so the
three tiers cannot be linked to each other or to circulation tokens. Each library also
carries companion query tables (`claims`, `policies`) drawn from its own visits, so a
package such as the claim check runs end to end.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from parties.ingest.governed import governed_visits
from parties.ledger.client import append_entry
from parties.runtime.context import NodeContext
from parties.runtime.topology import Role
from parties.secure_room.api import (
    LONG_CALL_S,
    PUBLISH_LIBRARY,
    LibraryBuild,
    LibrarySourceTooSmall,
    LibraryUpload,
    PublishedLibrary,
)
from parties.secure_room.wire import library_hash, library_to_wire, report_sha256

if TYPE_CHECKING:  # governance.synthetic pulls in scipy and scikit-learn: imported lazily
    from governance.synthetic import SynthesisSpec

LIBRARY_VISIT_FIELDS = ("birth_date", "sex", "admission_date", "discharge_date",
                        "diagnosis_code", "total_fen", "covered_fen", "self_pay_fen")
FEN_FIELDS = ("total_fen", "covered_fen", "self_pay_fen")
COMPANION_CLAIMS = 40
COMPANION_KINDS = ("true", "inflated", "fabricated", "uncovered", "date_off_by_one")
INSURERS = ("insurer-a", "insurer-b")
UNCOVERED_CATEGORY = "Z99"


# --- the authorized data, pseudonymized per use ----------------------------------------------


def pseudonym(key: bytes, value: bytes, length: int = 32) -> str:
    return hmac.new(key, value, hashlib.sha256).hexdigest()[:length]


def authorized_visits(ctx: NodeContext, key: bytes) -> pd.DataFrame:
    """The governed visits as a library table: identifiers replaced by pseudonyms under `key`.

    Name, phone, address and the national id are not even opened: the person is its
    level-1 token p1, pseudonymized again.
    """
    frame = governed_visits(ctx, LIBRARY_VISIT_FIELDS)
    out = pd.DataFrame({
        "visit_id": [f"{h}:{pseudonym(key, bytes(r), 12)}"
                     for h, r in zip(frame["hospital_id"], frame["visit_ref"], strict=True)],
        "hospital_id": frame["hospital_id"].astype(str),
        "national_id": [pseudonym(key, bytes(p)) for p in frame["p1"]],
    })
    for name in LIBRARY_VISIT_FIELDS:
        out[name] = frame[name].to_numpy()
    for name in FEN_FIELDS:
        out[name] = out[name].astype("int64")
    return out


def sample_spec() -> SynthesisSpec:
    """The standard visit spec; both identifier columns hold pseudonyms here."""
    from governance.synthetic import STANDARD_VISIT_SPEC

    return STANDARD_VISIT_SPEC.model_copy(
        update={"identifiers": {"visit_id": "visit_id", "national_id": "token"}})


def _mask_test_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The grading policy's masks; the person column already holds a pseudonym, not an id."""
    from governance.desensitize import VISIT_FIELD_TYPES, desensitize_frame

    types = {c: t for c, t in VISIT_FIELD_TYPES.items()
             if c in frame.columns and c != "national_id"}
    return desensitize_frame(frame, types)


def companion_queries(visits: pd.DataFrame, seed: int,
                      prefix: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Claims and policies drawn from a library's own visits, one of each planted kind."""
    rng = np.random.default_rng(seed)
    n = min(COMPANION_CLAIMS, len(visits))
    picked = visits.iloc[rng.choice(len(visits), size=n, replace=False)].reset_index(drop=True)
    claims, pairs = [], {}
    for i, row in picked.iterrows():
        kind = COMPANION_KINDS[int(i) % len(COMPANION_KINDS)]
        admitted = pd.Timestamp(row["admission_date"]).date()
        shift = {"fabricated": 7, "date_off_by_one": 1}.get(kind, 0)
        self_pay = int(row["self_pay_fen"])
        insurer = INSURERS[int(i) % len(INSURERS)]
        code = str(row["diagnosis_code"])
        claims.append({
            "claim_id": f"{prefix}{int(i):04d}", "insurer": insurer,
            "national_id": row["national_id"], "hospital_id": row["hospital_id"],
            "visit_date": admitted + dt.timedelta(days=shift),
            "claimed_fen": self_pay + 5000 if kind == "inflated" else max(self_pay, 1),
            "diagnosis_code": code,
        })
        covered, denied = pairs.setdefault((insurer, row["national_id"]), (set(), set()))
        (denied if kind == "uncovered" else covered).add(code.split(".")[0])
    policies = [{
        "policy_id": f"{prefix}P{j:04d}", "insurer": insurer, "national_id": person,
        "covered_categories": sorted(covered - denied) or [UNCOVERED_CATEGORY],
        "deductible_fen": 500 * (j % 2),
    } for j, ((insurer, person), (covered, denied)) in enumerate(pairs.items())]
    claims_frame = pd.DataFrame(claims)
    claims_frame["claimed_fen"] = claims_frame["claimed_fen"].astype("int64")
    policies_frame = pd.DataFrame(policies)
    policies_frame["deductible_fen"] = policies_frame["deductible_fen"].astype("int64")
    return claims_frame, policies_frame


# --- building and publishing the development libraries ----------------------------------------


def _privacy_fields(report: dict[str, Any]) -> dict[str, Any]:
    """The synthesis report's privacy verdict as log-safe integers (no floats in the log)."""
    if not report:
        return {}
    worst = max(report["fidelity"].values(), key=lambda f: f["value"])
    return {
        "exact_matches": int(report["exact_matches"]),
        "rows_below_threshold": int(report["rows_below_threshold"]),
        "dcr_min_micro": int(report["dcr_min"] * 1e6),
        "dcr_threshold_micro": int(report["dcr_threshold"] * 1e6),
        "worst_fidelity_micro": int(worst["value"] * 1e6),
    }


def build_libraries(ctx: NodeContext, build: LibraryBuild) -> list[PublishedLibrary]:
    """Build the sample and test libraries from the authorized data; publish them."""
    from governance.synthetic import sample_test_rows, synthesize, write_library

    authorized = authorized_visits(ctx, os.urandom(32))
    if len(authorized) < 20:
        raise LibrarySourceTooSmall(f"{len(authorized)} authorized rows; need at least 20")
    published = []
    with tempfile.TemporaryDirectory(prefix="cogov-libraries-") as work:
        for kind in ("sample", "test"):
            started = time.perf_counter()
            reports: dict[str, Any] = {}
            if kind == "sample":
                drawn = synthesize(authorized, build.sample_rows, build.seed, spec=sample_spec())
                visits = drawn.table
                reports["visits"] = drawn.report.model_dump(mode="json")
            else:
                visits = sample_test_rows(authorized, build.test_rows, build.seed,
                                          mask=_mask_test_rows)
            claims, policies = companion_queries(visits, build.seed, kind[0].upper())
            directory = Path(work) / kind
            write_library(directory, kind, {"visits": visits, "claims": claims,
                                            "policies": policies}, reports)
            published.append(_publish(ctx, build.name, kind, directory, reports,
                                      time.perf_counter() - started))
    return published


def _publish(ctx: NodeContext, name: str, kind: str, directory: Path,
             reports: dict[str, Any], seconds: float) -> PublishedLibrary:
    from governance.synthetic import read_library_info

    sha = library_hash(directory)
    tables = {n: t.rows for n, t in read_library_info(directory).tables.items()}
    upload = LibraryUpload(name=name, kind=kind, sha256=sha, files=library_to_wire(directory))
    operator = ctx.topology.node_of(Role.OPERATOR)
    with ctx.client(LONG_CALL_S) as client:
        client.call(operator, PUBLISH_LIBRARY, upload)
    report = reports.get("visits", {})
    with ctx.store.lock, ctx.store.conn as conn:
        conn.execute(
            "INSERT OR REPLACE INTO pa_libraries (name, kind, sha256, tables, report)"
            " VALUES (?, ?, ?, ?, ?)", (name, kind, sha, json.dumps(tables), json.dumps(report)))
    append_entry(ctx, "data_registered", {
        "dataset": f"{name}.{kind}", "owner": ctx.name, "stage": "library", "library": kind,
        "library_sha256": sha, "rows": tables["visits"], "tables": sorted(tables),
        "table_rows": [tables[t] for t in sorted(tables)], "recipient": operator,
        "report_sha256": report_sha256(report),
        **_privacy_fields(report),
    })
    ctx.log.event("library_published", name=name, kind=kind, sha256=sha, seconds=seconds)
    return PublishedLibrary(name=name, kind=kind, sha256=sha, tables=tables, report=report,
                            build_seconds=round(seconds, 3))
