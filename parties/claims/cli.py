"""`cogov claim check`: the insurer's side of the fast-claim check, batch or single claim.

    cogov claim check --insurer insurer-a --mode ss --claims data/claims.csv --out verdicts.csv
    cogov claim check --insurer insurer-a --mode he --claim-id C0000042
    cogov claim check --insurer insurer-a --national-id ... --hospital hospital-2 \\
        --visit-date 2025-11-27 --claimed-fen 7732 --diagnosis K29.7

Consents: `--consents FILE` (JSON lines `{"national_id": ..., "consent": {...}}`) is read
if it exists; otherwise the consumers' apps are simulated: each claimant's consent is
signed with their key for this insurer, derived from their master seed in
`<data>/consumer_keys.jsonl` (`governance.consent.consent_signing_key`), and written to
FILE when given. Either way the consents are registered at the regulator before the
check.

The claims are checked first, before a consent is issued or anything is sent: a malformed
field, a date that is not ISO `YYYY-MM-DD` or a hospital that is not in the topology exits
with one line naming the claim and the field (exit code 2, bad input).
"""

import json
import os
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from governance.consent import Consent, consent_signing_key, issue_consent
from governance.errors import GovernanceError
from mpc.claim.constants import RECORD_COLUMNS, VERDICT_OUTPUTS
from mpc.errors import MpcError
from parties.claims.client import Client, verdicts_to_csv
from parties.runtime.cli import StateOption, TopologyOption, console, exit_on, resolve_topology
from parties.runtime.errors import NodeError
from parties.runtime.state import StateDir, default_state_dir
from parties.stats.api import STATISTIC

claim_app = typer.Typer(help="The fast-claim check, as an insurer.", no_args_is_help=True)
CONSENT_DAYS = 365


def _issue_one(args: tuple[str, str, str, str, str, str, tuple[str, ...]]) -> str:
    master_seed_hex, national_id, insurer, purpose, not_before, not_after, outputs = args
    consent = issue_consent(
        consent_signing_key(bytes.fromhex(master_seed_hex), insurer), national_id,
        insurer=insurer, purpose=purpose,
        columns=RECORD_COLUMNS, outputs=outputs,
        not_before=datetime.fromisoformat(not_before), not_after=datetime.fromisoformat(not_after))
    return consent.model_dump_json()


def issue_consents(
    master_seeds: Mapping[str, str], national_ids: Iterable[str], insurer: str, *,
    purpose: str = "claim_settlement", days: int = CONSENT_DAYS, workers: int | None = None,
    statistics: bool = False,
) -> dict[str, Consent]:
    """What the consumers' apps do: each signs a consent for `insurer` (national id -> Consent);
    with `statistics`, its scope also lets the regulator's statistic count the claimant.

    `master_seeds` maps national id -> the consumer's master seed (hex); each consent is
    signed with the key derived from it for `insurer` alone. Issuing costs a scrypt per
    consent, so it runs on `workers` processes (default: every core).
    """
    now = datetime.now(UTC)
    ids = list(dict.fromkeys(national_ids))
    unknown = [i for i in ids if i not in master_seeds]
    if unknown:
        raise KeyError(f"no consumer key for {len(unknown)} claimants")
    outputs = (*VERDICT_OUTPUTS, STATISTIC) if statistics else VERDICT_OUTPUTS
    jobs = [(master_seeds[i], i, insurer, purpose, (now - timedelta(hours=1)).isoformat(),
             (now + timedelta(days=days)).isoformat(), outputs) for i in ids]
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(jobs) > 8:
        with ProcessPoolExecutor(workers) as pool:
            docs = list(pool.map(_issue_one, jobs, chunksize=8))
    else:
        docs = [_issue_one(j) for j in jobs]
    return {i: Consent.model_validate_json(d) for i, d in zip(ids, docs, strict=True)}


def consumer_keys(path: Path) -> dict[str, str]:
    """national id -> master seed hex (the consumer app's secret), from the generator's
    consumer_keys.jsonl."""
    keys = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                row = json.loads(line)
                if "master_seed" not in row:
                    raise ValueError(
                        f"{path}:{number}: one consent key per consumer; consent keys are now "
                        "per insurer: generate the data again (`cogov data generate`)")
                keys[row["national_id"]] = row["master_seed"]
    return keys


def read_consents(path: Path) -> dict[str, Consent]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["national_id"]] = Consent.model_validate(row["consent"])
    return out


def write_consents(path: Path, consents: Mapping[str, Consent]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(
        json.dumps({"national_id": n, "consent": c.model_dump(mode="json")}) + "\n"
        for n, c in consents.items()), encoding="utf-8")
    tmp.replace(path)


def _claims_frame(claims_file: Path, insurer: str, claim_id: str | None,
                  explicit: dict[str, object]) -> pd.DataFrame:
    if explicit.get("national_id"):
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise typer.BadParameter(f"a single explicit claim also needs {missing}")
        return pd.DataFrame([{"claim_id": claim_id or "C1", "insurer": insurer, **explicit}])
    frame = pd.read_csv(claims_file, dtype=str)
    if "claimed_fen" in frame:
        frame["claimed_fen"] = frame["claimed_fen"].map(_fen)
    if "insurer" in frame:
        frame = frame[frame["insurer"] == insurer]
    if claim_id is not None:
        frame = frame[frame["claim_id"] == claim_id]
        if frame.empty:
            raise typer.BadParameter(f"no claim {claim_id} of {insurer} in {claims_file}")
    return frame.reset_index(drop=True)


def _fen(value: object) -> object:
    """An amount read as text: an integer if it spells one, else as read (the client then
    refuses it, naming its claim)."""
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        return int(value)
    return value


@claim_app.command("check")
def check(
    insurer: Annotated[str, typer.Option(help="The insurer node (its certificate is used).")],
    mode: Annotated[str, typer.Option(help="ss | he | plain")] = "ss",
    claims: Annotated[Path | None, typer.Option(help="Claims CSV (default <data>/claims.csv)."
                                                )] = None,
    out: Annotated[Path, typer.Option(help="Verdicts CSV to write.")] = Path("verdicts.csv"),
    consents: Annotated[Path | None, typer.Option(
        help="Consents (JSON lines); issued from the consumer keys and saved here if absent."
    )] = None,
    data: Annotated[Path, typer.Option(help="Generated data directory.")] = Path("data"),
    statistics: Annotated[bool, typer.Option(
        help="Consents issued here also allow the regulator's statistic "
             "(`cogov stats claimant-self-pay`) to count the claimant.")] = False,
    policies: Annotated[Path | None, typer.Option(
        help="The insurer's policies CSV (default <data>/policies.csv).")] = None,
    contract: Annotated[str | None, typer.Option(
        help="Contract id (default claim-check-<insurer>-2026).")] = None,
    batch_size: Annotated[int, typer.Option(help="Claims per request.")] = 2000,
    claim_id: Annotated[str | None, typer.Option(help="Check only this claim.")] = None,
    national_id: Annotated[str | None, typer.Option(help="Single claim: national id.")] = None,
    hospital: Annotated[str | None, typer.Option(help="Single claim: hospital id.")] = None,
    visit_date: Annotated[str | None, typer.Option(help="Single claim: YYYY-MM-DD.")] = None,
    claimed_fen: Annotated[int | None, typer.Option(help="Single claim: amount in fen.")] = None,
    diagnosis: Annotated[str | None, typer.Option(help="Single claim: ICD-10 code.")] = None,
    state: StateOption = default_state_dir(),
    topology: TopologyOption = None,
) -> None:
    """Check claims through the regulator's product; write the verdicts (and nothing else)."""
    _, topo = resolve_topology(state, topology)
    explicit = {"national_id": national_id, "hospital_id": hospital, "visit_date": visit_date,
                "claimed_fen": claimed_fen, "diagnosis_code": diagnosis}
    with exit_on(NodeError, MpcError, GovernanceError, ValueError, KeyError, OSError):
        frame = _claims_frame(claims or data / "claims.csv", insurer, claim_id, explicit)
        if frame.empty:
            console.print(f"[yellow]no claims of {insurer} to check[/yellow]")
            raise typer.Exit(0)
        policy_frame = pd.read_csv(policies or data / "policies.csv", dtype={"national_id": str})
        with Client(insurer, state=StateDir(state), topology=topo, contract_id=contract,
                    policies=policy_frame, batch_size=batch_size) as client:
            frame = client.validated(frame)  # before any consent is issued or sent
            if consents is not None and consents.exists():
                given = read_consents(consents)
            else:
                with console.status(f"issuing {frame['national_id'].nunique():,} consents"):
                    given = issue_consents(consumer_keys(data / "consumer_keys.jsonl"),
                                           frame["national_id"], insurer,
                                           statistics=statistics)
                if consents is not None:
                    write_consents(consents, given)
            needed = {n: given[n] for n in frame["national_id"] if n in given}
            with console.status(f"registering {len(needed):,} consents at the regulator"):
                client.register_consents(needed.values())
            with Progress(TextColumn("checking claims"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console) as bar:
                task = bar.add_task("claims", total=len(frame))
                sizes = [len(frame.iloc[i:i + client.batch_size])
                         for i in range(0, len(frame), client.batch_size)]
                verdicts = client.check(frame, given, mode,
                                        on_batch=lambda i, n: bar.advance(task, sizes[i - 1]))
    verdicts_to_csv(verdicts, out)
    if len(verdicts) == 1:
        console.print_json(verdicts.iloc[0].to_json())
    found = int(verdicts["visit_found"].sum())
    payable = int(verdicts["diagnosis_covered"].sum())
    console.print(f"{len(verdicts):,} claims checked ({mode}): {found:,} visits found, "
                  f"{payable:,} covered; verdicts in {out}")
