"""Classification and grading: each column gets a category and a level L1..L4 from a policy.

The policy is an editable TOML file (default `governance/policies/grading.toml`),
validated by pydantic on load; an invalid policy is refused with an error that names
the offending field, before anything is classified.
"""

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from governance.errors import GovernanceError
from governance.scan import ColumnProfile, ScanReport, TableProfile

DEFAULT_POLICY = Path(__file__).parent / "policies" / "grading.toml"


class PolicyError(GovernanceError):
    """A policy file is missing, not TOML, or fails validation (the message names the field)."""

    http_status = 422


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sensitive_type: list[str] | None = None
    field: list[str] | None = None
    content_kind: list[str] | None = None
    contains_sensitive: list[str] | None = None
    column_pattern: str | None = None

    _lists = field_validator(
        "sensitive_type", "field", "content_kind", "contains_sensitive", mode="before"
    )(_as_list)

    @field_validator("column_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> "Condition":
        if not self.model_fields_set:
            raise ValueError("a rule needs at least one condition")
        return self

    def holds(self, column: ColumnProfile, field: str | None) -> bool:
        if self.sensitive_type is not None and column.sensitive_type not in self.sensitive_type:
            return False
        if self.field is not None and field not in self.field:
            return False
        if self.content_kind is not None and column.content_kind not in self.content_kind:
            return False
        if self.contains_sensitive is not None and not set(column.contains_sensitive) & set(
            self.contains_sensitive
        ):
            return False
        pattern = self.column_pattern
        return pattern is None or re.search(pattern, column.name) is not None


class Grade(BaseModel):
    model_config = ConfigDict(extra="forbid")

    category: str = Field(min_length=1)
    level: str


class Rule(Grade):
    name: str = Field(min_length=1)
    when: Condition


class MaskRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rule: Literal[
        "keep", "drop", "keep_region", "surname_stars", "mask_middle", "district", "year",
        "category", "bucket",
    ]
    enabled: bool = True
    keep_start: int = Field(default=3, ge=0)
    keep_end: int = Field(default=4, ge=0)
    width_fen: int = Field(default=100_000, gt=0)
    mask_char: str = Field(default="*", min_length=1, max_length=1)


class GradingPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    levels: dict[str, str] = Field(min_length=1)
    rules: list[Rule] = Field(default_factory=list)
    default: Grade
    desensitize: dict[str, MaskRule] = Field(default_factory=dict)

    @field_validator("levels")
    @classmethod
    def _level_names(cls, levels: dict[str, str]) -> dict[str, str]:
        bad = [k for k in levels if not re.fullmatch(r"L\d", k)]
        if bad:
            raise ValueError(f"level names must look like L1..L9, got {bad}")
        return levels

    @model_validator(mode="after")
    def _levels_defined(self) -> "GradingPolicy":
        for i, rule in enumerate(self.rules):
            if rule.level not in self.levels:
                raise ValueError(
                    f"rules.{i}.level: {rule.level!r} is not one of {list(self.levels)}"
                )
        if self.default.level not in self.levels:
            raise ValueError(f"default.level: {self.default.level!r} is not defined in [levels]")
        return self

    def grade(self, column: ColumnProfile, field: str | None = None) -> tuple[Grade, str]:
        """The grade of a column and the name of the rule that decided it."""
        for rule in self.rules:
            if rule.when.holds(column, field):
                return Grade(category=rule.category, level=rule.level), rule.name
        return self.default, "default"


def parse_policy(text: str, origin: str = "<policy>") -> GradingPolicy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{origin}: not valid TOML: {exc}") from exc
    try:
        return GradingPolicy.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        where = ".".join(str(p) for p in first["loc"])
        detail = f"{origin}: {where}: {message}" if where else f"{origin}: {message}"
        raise PolicyError(detail) from exc


def load_policy(path: Path | str | None = None) -> GradingPolicy:
    """Load and validate a grading policy (the default one when `path` is None)."""
    path = Path(path) if path is not None else DEFAULT_POLICY
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy ({exc.strerror})") from exc
    return parse_policy(text, str(path))


class ColumnGrade(BaseModel):
    table: str
    column: str
    field: str | None
    sensitive_type: str | None
    category: str
    level: str
    level_label: str
    rule: str


class Classification(BaseModel):
    columns: list[ColumnGrade]

    def level_of(self, table: str, column: str) -> str:
        for c in self.columns:
            if c.table == table and c.column == column:
                return c.level
        raise KeyError((table, column))

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def classify_table(
    profile: TableProfile,
    policy: GradingPolicy,
    fields: Mapping[str, str] | None = None,
) -> list[ColumnGrade]:
    """Grade every column of a scanned table; `fields` maps raw columns to model fields."""
    out = []
    for column in profile.columns:
        fld = (fields or {}).get(column.name)
        grade, rule = policy.grade(column, fld)
        out.append(ColumnGrade(
            table=profile.table, column=column.name, field=fld,
            sensitive_type=column.sensitive_type, category=grade.category, level=grade.level,
            level_label=policy.levels[grade.level], rule=rule,
        ))
    return out


def classify_report(
    report: ScanReport,
    policy: GradingPolicy | None = None,
    fields: Mapping[str, Mapping[str, str]] | None = None,
) -> Classification:
    """Grade every column of a scan report; `fields` is keyed by table name."""
    policy = policy or load_policy()
    return Classification(columns=[
        grade for t in report.tables
        for grade in classify_table(t, policy, (fields or {}).get(t.table))
    ])


def render_classification(result: Classification) -> Any:
    from rich.table import Table

    colour = {"L1": "green", "L2": "cyan", "L3": "yellow", "L4": "bold red"}
    table = Table(title="classification and grading")
    for head in ("table", "column", "field", "sensitive", "category", "level", "rule"):
        table.add_column(head)
    for c in result.columns:
        style = colour.get(c.level, "")
        table.add_row(c.table, c.column, c.field or "", c.sensitive_type or "", c.category,
                      f"[{style}]{c.level} {c.level_label}[/]" if style else c.level, c.rule)
    return table
