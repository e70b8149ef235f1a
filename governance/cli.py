"""`cogov govern ...`: the health authority's governance pipeline on files and directories."""

import json
from pathlib import Path
from typing import Annotated

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from governance.classify import classify_report, load_policy, render_classification
from governance.desensitize import desensitize_scanned, desensitize_visits
from governance.errors import GovernanceError
from governance.scan import TABLE_SUFFIXES, read_batches, render_report, scan_frame, scan_path
from governance.standardize import (
    COMMON_FIELDS,
    StandardizationError,
    align_patients,
    infer_mapping,
    load_overrides,
    standardize_to_parquet,
)

EncodingOption = Annotated[str | None, typer.Option(
    help="Text encoding of CSV and JSON-lines files (default: detect UTF-8, with or without "
    "BOM, then GB18030).")]

app = typer.Typer(
    help="Asset scan, classification and grading, standardization and desensitization.",
    no_args_is_help=True,
)
console = Console()


def _fail(exc: GovernanceError) -> None:
    console.print(f"[bold red]{type(exc).__name__}[/]: {exc}")
    raise typer.Exit(code=2)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


@app.command()
def scan(
    path: Annotated[Path, typer.Argument(help="A file, SQLite database or directory.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    threshold: Annotated[float, typer.Option(help="Share of values that must match.")] = 0.8,
    sample: Annotated[int, typer.Option(help="Values sampled per column.")] = 2000,
    full: Annotated[bool, typer.Option(help="Validate every value, not a sample.")] = False,
    encoding: EncodingOption = None,
) -> None:
    """Inventory every table and column; flag sensitive columns by their content."""
    try:
        with console.status(f"scanning {path}"):
            report = scan_path(path, threshold=threshold, sample_size=sample, full=full,
                               encoding=encoding)
    except GovernanceError as exc:
        _fail(exc)
    console.print(render_report(report))
    flagged = report.flagged()
    console.print(f"{len(report.tables)} tables, {len(flagged)} sensitive columns")
    if json_out:
        _write_atomic(json_out, report.to_json())


@app.command()
def classify(
    path: Annotated[Path, typer.Argument(help="A file, SQLite database or directory.")],
    policy: Annotated[Path | None, typer.Option(help="Grading policy TOML.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
    encoding: EncodingOption = None,
) -> None:
    """Scan, then give every column a category and a level L1..L4 from the policy."""
    try:
        grading = load_policy(policy)
        report = scan_path(path, encoding=encoding)
        fields = {}
        for table in report.tables:
            if table.format in ("csv", "parquet", "jsonl"):
                fields[table.table] = _try_mapping(Path(table.source), table.table, encoding)
        result = classify_report(report, grading, fields)
    except GovernanceError as exc:
        _fail(exc)
    console.print(render_classification(result))
    if json_out:
        _write_atomic(json_out, result.to_json())


def _try_mapping(path: Path, hospital_id: str, encoding: str | None) -> dict[str, str]:
    """The common-model fields of a table's columns when it is a visit export, else {}."""
    try:
        first = next(read_batches(path, encoding))
        return infer_mapping(first.head(2000), hospital_id).columns()
    except (GovernanceError, StopIteration):
        return {}


def _sources(items: list[str]) -> dict[str, Path]:
    sources: dict[str, Path] = {}
    for item in items:
        if "=" in item:
            hospital, _, raw = item.partition("=")
            sources[hospital] = Path(raw)
        elif Path(item).is_dir():
            for p in sorted(Path(item).iterdir()):
                if TABLE_SUFFIXES.get(p.suffix.lower()) in ("csv", "parquet", "jsonl"):
                    sources[p.stem] = p
        else:
            sources[Path(item).stem] = Path(item)
    return sources


@app.command()
def standardize(
    sources: Annotated[list[str], typer.Argument(
        help="HOSPITAL=FILE pairs, files (hospital id = file stem) or directories of exports.")],
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("data/standardized"),
    overrides: Annotated[Path | None, typer.Option(help="Schema overrides TOML.")] = None,
    encoding: EncodingOption = None,
) -> None:
    """Map each hospital export onto the common model; align patients across hospitals.

    Writes OUT/<hospital>.parquet, OUT/mappings.json and OUT/alignment.json.
    """
    try:
        config = load_overrides(overrides)
        found = _sources(sources)
        if not found:
            raise StandardizationError("no hospital exports given")
        out.mkdir(parents=True, exist_ok=True)
        mappings = {}
        columns = ["visit_id", "hospital_id", "national_id", "name", "phone", "sex",
                   "birth_date", "address"]
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("standardizing", total=len(found))
            for hospital, path in found.items():
                bar.update(task, description=f"standardizing {hospital}")
                mapping = standardize_to_parquet(path, hospital, out / f"{hospital}.parquet",
                                                 config.for_hospital(hospital), encoding)
                mappings[hospital] = mapping.model_dump()
                bar.advance(task)
        table = pa.concat_tables(
            [pq.read_table(out / f"{h}.parquet", columns=columns) for h in found])
        alignment = align_patients(table)
    except GovernanceError as exc:
        _fail(exc)
    _write_atomic(out / "mappings.json", json.dumps(mappings, ensure_ascii=False, indent=2))
    _write_atomic(out / "alignment.json", alignment.model_dump_json(indent=2))
    console.print(
        f"{table.num_rows:,} visits of {alignment.persons:,} persons "
        f"({alignment.persons_in_several_hospitals:,} in several hospitals), "
        f"{len(alignment.conflicts)} attribute conflicts -> {out}"
    )


@app.command()
def desensitize(
    source: Annotated[Path, typer.Argument(help="A common-model Parquet file or any table.")],
    out: Annotated[Path, typer.Option(help="Masked output (.parquet or .csv).")],
    policy: Annotated[Path | None, typer.Option(help="Grading policy TOML.")] = None,
    encoding: EncodingOption = None,
) -> None:
    """Mask sensitive columns with the masking rules of the grading policy.

    Common-model tables are masked by field; any other table by what a scan detects.
    """
    try:
        grading = load_policy(policy)
        frame = pd.concat(list(read_batches(source, encoding)), ignore_index=True)
        if set(COMMON_FIELDS) <= set(frame.columns):
            masked = desensitize_visits(frame, grading)
        else:
            masked = desensitize_scanned(frame, scan_frame(frame, source.stem), grading)
    except GovernanceError as exc:
        _fail(exc)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix.lower() == ".csv":
        masked.to_csv(tmp, index=False)
    else:
        masked.astype(object).to_parquet(tmp, index=False)
    tmp.replace(out)
    console.print(f"{len(masked):,} rows masked -> {out}")


