"""Algorithm packages: the manifest, the content hash, static checks and owner approval.

A package is a directory holding `manifest.toml` and Python code. Its identity is the
SHA-256 of a canonical listing of every file (path and bytes); the owner of the data
approves exactly that hash with an Ed25519 signature, so a package changed by one byte
is a different, unapproved package.

Static checks are a first filter, not the boundary: the secure room runs every package
in an OS sandbox whatever the checks said. What they catch (best effort, from the AST):
imports outside an allowlist; calls to builtins that reach outside the computation
(`open`, `exec`, `eval`, `compile`, `__import__`, `getattr` on a module or with a
computed name, ...); dunder attribute access (the classic `().__class__.__subclasses__()`
escape); pandas/numpy file I/O methods; string literals used as column keys
(`df["x"]`, `df[["x", "y"]]`, `on=`, `by=`, `subset=`, ...) that no declared input or
output column, input name, or column the code itself creates accounts for; compiled or
binary files and symlinks; and an entry point that is missing or has the wrong signature.
What they miss: columns named through variables or computed strings, attribute-style
column access (`df.col`), and anything reachable only at run time. The secure room
closes the column gap by handing the package only its declared columns.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib.machinery
import json
import math
import re
import sys
import tomllib
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from governance.errors import GovernanceError

MANIFEST_FILE = "manifest.toml"
HASH_FILE = "package.sha256"
HASH_DOMAIN = b"cogov-package-v1\x00"
DEFAULT_MIN_GROUP_SIZE = 10
VERDICT_KEY = "claim_id"  # a verdict's rows are keyed by the claim ids the room hands in

Library = Literal["sample", "test", "authorized"]
Disclosure = Literal["verdict", "aggregate", "model"]
ColumnType = Literal["string", "int64", "float64", "bool", "date", "decimal"]

ALLOWED_IMPORTS: frozenset[str] = frozenset(
    {
        "__future__", "math", "statistics", "datetime", "decimal", "fractions",
        "collections", "itertools", "functools", "operator", "typing", "dataclasses",
        "enum", "numbers", "re", "numpy", "pandas",
    }
)
FORBIDDEN_BUILTINS: frozenset[str] = frozenset(
    {
        "open", "exec", "eval", "compile", "__import__", "input", "breakpoint", "globals",
        "locals", "vars", "help", "exit", "quit", "memoryview", "setattr", "delattr",
    }
)
FORBIDDEN_NAMES: frozenset[str] = frozenset({"__builtins__", "__loader__", "__spec__"})
ALLOWED_DUNDER_ATTRIBUTES: frozenset[str] = frozenset({"__name__", "__doc__", "__init__"})
# pandas / numpy methods that read or write files (or unpickle).
FORBIDDEN_ATTRIBUTES: frozenset[str] = frozenset(
    {
        "read_csv", "read_parquet", "read_pickle", "read_json", "read_excel", "read_sql",
        "read_sql_query", "read_sql_table", "read_table", "read_fwf", "read_hdf",
        "read_feather", "read_orc", "read_stata", "read_sas", "read_spss", "read_xml",
        "read_html", "read_clipboard", "to_csv", "to_parquet", "to_pickle", "to_excel",
        "to_sql", "to_hdf", "to_feather", "to_stata", "to_clipboard", "to_orc", "to_xml",
        "load", "save", "savez", "savez_compressed", "fromfile", "tofile", "loadtxt",
        "savetxt", "genfromtxt", "memmap", "ctypeslib", "system",
    }
)
# Keyword arguments whose string values name columns.
COLUMN_KEYWORDS: frozenset[str] = frozenset(
    {"on", "left_on", "right_on", "by", "subset", "columns", "index", "values", "id_vars",
     "value_vars", "usecols"}
)
# Methods whose positional string arguments name columns.
COLUMN_METHODS: frozenset[str] = frozenset(
    {"groupby", "sort_values", "drop_duplicates", "set_index", "pivot_table", "dropna",
     "drop", "explode", "nlargest", "nsmallest", "value_counts", "melt"}
)
COMPILED_SUFFIXES: tuple[str, ...] = (".pyc", ".pyo", ".so", ".pyd", ".dll", ".dylib")
# Submodules of allowed libraries that reach files, C or other processes.
FORBIDDEN_SUBMODULES: frozenset[str] = frozenset(
    {"ctypeslib", "f2py", "distutils", "io", "npyio", "testing", "_testing"}
)


class PackageError(GovernanceError):
    """Base of every algorithm-package error."""

    http_status = 400


class PackageInvalid(PackageError):
    """The package directory or its manifest is malformed; the detail names the field."""

    http_status = 422


class PackageExists(PackageError):
    """`init` was pointed at a directory that already holds files."""

    http_status = 409


class PackageNotApproved(PackageError):
    """No valid owner approval covers this package."""

    http_status = 403


class PackageHashMismatch(PackageNotApproved):
    """An approval exists, but the package's content no longer has the approved hash."""

    http_status = 409


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OutputColumn(_Model):
    name: str = Field(min_length=1, max_length=64)
    type: ColumnType
    scale: int | None = Field(default=None, ge=0, le=18, description="decimal places")
    tolerance: Decimal | None = Field(
        default=None, gt=0, description="released precision: values are rounded to a multiple")
    maximum: Decimal | None = Field(
        default=None, ge=0, description="released values lie in [0, maximum]; others are refused")

    @model_validator(mode="after")
    def _scale_only_for_decimal(self) -> OutputColumn:
        if (self.type == "decimal") != (self.scale is not None):
            raise ValueError("scale is required for type 'decimal' and only for it")
        if (self.tolerance is not None or self.maximum is not None) and self.type not in (
                "decimal", "float64"):
            raise ValueError("tolerance/maximum: only for 'decimal' and 'float64' columns")
        if self.tolerance is not None and self.scale is not None and (
                self.tolerance.as_tuple().exponent < -self.scale):
            raise ValueError("tolerance: finer than the column's scale")
        return self

    @property
    def bits(self) -> float | None:
        """Most bits one cell can carry: 1 for a boolean, log2 of the released values of
        a bounded amount (0 to `maximum` in steps of `tolerance`); None when unbounded."""
        if self.type == "bool":
            return 1.0
        if self.tolerance is None or self.maximum is None:
            return None
        return math.log2(int(self.maximum / self.tolerance) + 1)


class PackageInput(_Model):
    name: str = Field(pattern=r"^[a-z_][a-z0-9_]*$", description="key the table is passed under")
    dataset: str = Field(pattern=r"^[a-z_][a-z0-9_]*$", description="table in the library")
    libraries: list[Library] = Field(min_length=1)
    columns: list[str] = Field(min_length=1)

    @field_validator("columns", "libraries")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("entries must be unique")
        return value


class PackageOutput(_Model):
    disclosure: Disclosure
    columns: list[OutputColumn] = Field(min_length=1)
    row_level: bool = False
    max_rows: int | None = Field(
        default=None, ge=1, description="row-level output: the most rows a run releases")
    min_group_size: int | None = Field(default=None, ge=1)
    count_column: str | None = None

    @model_validator(mode="after")
    def _disclosure_rules(self) -> PackageOutput:
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names):
            raise ValueError("columns: names must be unique")
        if self.disclosure == "aggregate":
            if self.count_column is None:
                raise ValueError("count_column: required for disclosure 'aggregate'")
            by_name = {c.name: c for c in self.columns}
            if self.count_column not in by_name or by_name[self.count_column].type != "int64":
                raise ValueError("count_column: must name an int64 output column")
        elif self.count_column is not None or self.min_group_size is not None:
            raise ValueError("count_column/min_group_size: only for disclosure 'aggregate'")
        if self.disclosure == "verdict":
            self._verdict_shape()
        if self.max_rows is not None and not self.row_level:
            raise ValueError("max_rows: only for row-level output")
        return self

    def _verdict_shape(self) -> None:
        """A verdict is `claim_id` plus booleans and bounded amounts: one row per claim."""
        if self.row_level:
            raise ValueError("row_level: a verdict is one row per claim, not row-level output")
        by_name = {c.name: c for c in self.columns}
        if VERDICT_KEY not in by_name or by_name[VERDICT_KEY].type != "string":
            raise ValueError(f"columns: a verdict needs a string column '{VERDICT_KEY}'")
        for column in self.columns:
            if column.name == VERDICT_KEY:
                continue
            if column.type not in ("bool", "decimal"):
                raise ValueError(f"columns: verdict column '{column.name}' must be a boolean "
                                 "or a decimal amount")
            if column.type == "decimal" and (column.tolerance is None or column.maximum is None):
                raise ValueError(f"columns: verdict amount '{column.name}' needs a tolerance "
                                 "and a maximum")

    @property
    def bits_per_claim(self) -> float | None:
        """For a verdict, the most bits one claim's row can carry beyond its own id."""
        if self.disclosure != "verdict":
            return None
        return sum(c.bits or 0.0 for c in self.columns if c.name != VERDICT_KEY)

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def group_size_floor(self) -> int:
        return self.min_group_size or DEFAULT_MIN_GROUP_SIZE


class PackageManifest(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")
    version: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    entry_point: str = Field(pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
    description: str = ""
    inputs: list[PackageInput] = Field(min_length=1)
    output: PackageOutput

    @field_validator("inputs")
    @classmethod
    def _unique_input_names(cls, value: list[PackageInput]) -> list[PackageInput]:
        names = [i.name for i in value]
        if len(set(names)) != len(names):
            raise ValueError("input names must be unique")
        return value

    @model_validator(mode="after")
    def _verdict_claims(self) -> PackageManifest:
        if self.output.disclosure == "verdict" and len(
                [i for i in self.inputs if VERDICT_KEY in i.columns]) != 1:
            raise ValueError(f"inputs: a verdict needs exactly one input declaring "
                             f"'{VERDICT_KEY}' (the claims it judges)")
        return self

    @property
    def claims_input(self) -> str | None:
        """The input whose claim ids key a verdict's rows."""
        if self.output.disclosure != "verdict":
            return None
        return next(i.name for i in self.inputs if VERDICT_KEY in i.columns)

    @property
    def entry_module(self) -> str:
        return self.entry_point.split(":")[0]

    @property
    def entry_function(self) -> str:
        return self.entry_point.split(":")[1]


def load_manifest(package_dir: Path | str) -> PackageManifest:
    """Read and validate `manifest.toml`; errors name the offending field."""
    path = Path(package_dir) / MANIFEST_FILE
    if not path.is_file():
        raise PackageInvalid(f"{path}: no {MANIFEST_FILE}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PackageInvalid(f"{MANIFEST_FILE}: not valid TOML: {exc}") from exc
    try:
        return PackageManifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise PackageInvalid(f"{MANIFEST_FILE}: {problems}") from exc


# --- content hash ----------------------------------------------------------------------


def package_files(package_dir: Path | str) -> list[Path]:
    """Every file that makes up the package, sorted by relative POSIX path.

    Excludes `package.sha256` and `__pycache__/`; refuses symlinks, which could point
    anywhere.
    """
    root = Path(package_dir)
    if not root.is_dir():
        raise PackageInvalid(f"{root}: not a directory")
    files: list[Path] = []
    for path in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts:
            continue
        if path.is_symlink():
            raise PackageInvalid(f"{rel.as_posix()}: symlinks are not allowed in a package")
        if path.is_file() and rel.as_posix() != HASH_FILE:
            files.append(path)
    return files


def package_hash(package_dir: Path | str) -> str:
    """SHA-256 (hex) over the canonical listing: each file's length-prefixed path and bytes."""
    root = Path(package_dir)
    digest = hashlib.sha256(HASH_DOMAIN)
    for path in package_files(root):
        rel = path.relative_to(root).as_posix().encode("utf-8")
        data = path.read_bytes()
        digest.update(len(rel).to_bytes(8, "big") + rel)
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def write_package_hash(package_dir: Path | str) -> str:
    """Compute the hash and store it in `package.sha256` beside the manifest."""
    value = package_hash(package_dir)
    target = Path(package_dir) / HASH_FILE
    tmp = target.with_suffix(".tmp")
    tmp.write_text(value + "\n", encoding="ascii")
    tmp.replace(target)
    return value


# --- scaffold --------------------------------------------------------------------------

_MANIFEST_TEMPLATE = '''name = "{name}"
version = "0.1.0"
entry_point = "{module}:run"
description = "What this package computes, in one line."

[[inputs]]
name = "visits"
dataset = "visits"
libraries = ["sample", "test"]
columns = ["hospital_id", "total_fen"]

[output]
disclosure = "aggregate"
count_column = "n"
min_group_size = 10

[[output.columns]]
name = "hospital_id"
type = "string"

[[output.columns]]
name = "n"
type = "int64"

[[output.columns]]
name = "total_fen"
type = "int64"
'''

_CODE_TEMPLATE = '''"""{name}: entry point of the algorithm package."""

import pandas as pd


def run(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Return one row per hospital: visit count and total billed (fen)."""
    visits = tables["visits"]
    grouped = visits.groupby("hospital_id", as_index=False).agg(
        n=("total_fen", "size"), total_fen=("total_fen", "sum")
    )
    return grouped[["hospital_id", "n", "total_fen"]]
'''


def init_package(target_dir: Path | str, name: str) -> Path:
    """Scaffold a runnable package (manifest + code) in an empty or missing directory."""
    target = Path(target_dir)
    if target.exists() and any(target.iterdir()):
        raise PackageExists(f"{target}: directory is not empty")
    module = re.sub(r"\W", "_", name).lower()
    text = _MANIFEST_TEMPLATE.format(name=name, module=module)
    try:
        PackageManifest.model_validate(tomllib.loads(text))
    except ValidationError as exc:
        raise PackageInvalid(f"name: {exc.errors()[0]['msg']}") from exc
    target.mkdir(parents=True, exist_ok=True)
    (target / f"{module}.py").write_text(_CODE_TEMPLATE.format(name=name), encoding="utf-8")
    (target / MANIFEST_FILE).write_text(text, encoding="utf-8")
    return target


# --- static checks ---------------------------------------------------------------------

FindingCode = Literal[
    "syntax_error",
    "entry_point_missing",
    "entry_point_signature",
    "forbidden_import",
    "forbidden_call",
    "forbidden_name",
    "forbidden_attribute",
    "undeclared_column",
    "forbidden_file",
    "shadowed_module",
]


class Finding(_Model):
    """One static-check result, tied to a file and line where there is one."""

    code: FindingCode
    severity: Literal["error", "warning"] = "error"
    file: str
    line: int | None = None
    message: str


def _is_str(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _string_items(node: ast.AST) -> list[ast.Constant]:
    """String constants in `node`, or in a list/tuple/set literal `node`."""
    if _is_str(node):
        return [node]  # type: ignore[list-item]
    if isinstance(node, ast.List | ast.Tuple | ast.Set):
        return [e for e in node.elts if _is_str(e)]  # type: ignore[misc]
    return []


class _Checker(ast.NodeVisitor):
    def __init__(self, file: str, local_modules: set[str]) -> None:
        self.file = file
        self.local_modules = local_modules
        self.findings: list[Finding] = []
        self.module_aliases: set[str] = set()
        self.column_uses: list[tuple[str, int]] = []
        self.created_columns: set[str] = set()

    def _add(self, code: FindingCode, node: ast.AST, message: str) -> None:
        line = getattr(node, "lineno", None)
        self.findings.append(Finding(code=code, file=self.file, line=line, message=message))

    def _check_module(self, node: ast.AST, module: str) -> None:
        top = module.split(".")[0]
        if top not in ALLOWED_IMPORTS and top not in self.local_modules:
            self._add("forbidden_import", node, f"import of '{module}' is not on the allowlist")
        elif FORBIDDEN_SUBMODULES.intersection(module.split(".")[1:]):
            self._add("forbidden_import", node, f"import of '{module}' reaches outside the data")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_module(node, alias.name)
            self.module_aliases.add(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._check_module(node, node.module)
        for alias in node.names:
            if alias.name == "*":
                self._add("forbidden_import", node, "star imports hide what is used")
            elif alias.name in FORBIDDEN_ATTRIBUTES or alias.name in FORBIDDEN_SUBMODULES:
                self._add("forbidden_import", node, f"import of '{alias.name}' reaches files")
            elif alias.name.startswith("__"):
                self._add("forbidden_import", node, f"import of '{alias.name}'")

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in FORBIDDEN_NAMES:
            self._add("forbidden_name", node, f"use of '{node.id}'")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        attr = node.attr
        if attr.startswith("__") and attr.endswith("__") and attr not in ALLOWED_DUNDER_ATTRIBUTES:
            self._add("forbidden_attribute", node, f"dunder attribute '{attr}'")
        elif attr in FORBIDDEN_ATTRIBUTES:
            self._add("forbidden_attribute", node, f"'.{attr}' reads or writes files")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name):
            if func.id in FORBIDDEN_BUILTINS:
                self._add("forbidden_call", node, f"call to '{func.id}'")
            elif func.id in {"getattr", "hasattr"}:
                self._check_getattr(node)
        if isinstance(func, ast.Attribute):
            if func.attr in COLUMN_METHODS:
                for arg in node.args:
                    self._use_columns(arg)
            if func.attr == "assign":
                self.created_columns.update(k.arg for k in node.keywords if k.arg)
            if func.attr in {"rename", "agg", "aggregate", "named_agg"}:
                self._created_from_call(node)
        for keyword in node.keywords:
            if keyword.arg in COLUMN_KEYWORDS:
                self._use_columns(keyword.value)
        self.generic_visit(node)

    def _check_getattr(self, node: ast.Call) -> None:
        if len(node.args) < 2 or not _is_str(node.args[1]):
            self._add("forbidden_call", node, "getattr with a computed attribute name")
            return
        target = node.args[0]
        if isinstance(target, ast.Name) and target.id in self.module_aliases:
            self._add("forbidden_call", node, f"getattr on module '{target.id}'")
        name = node.args[1].value  # type: ignore[attr-defined]
        if name.startswith("__") or name in FORBIDDEN_ATTRIBUTES:
            self._add("forbidden_call", node, f"getattr of '{name}'")

    def _created_from_call(self, node: ast.Call) -> None:
        for keyword in node.keywords:
            if keyword.arg == "columns" and isinstance(keyword.value, ast.Dict):
                self.created_columns.update(
                    v.value for v in keyword.value.values if _is_str(v)  # type: ignore[union-attr]
                )
            elif keyword.arg:
                self.created_columns.add(keyword.arg)

    def _use_columns(self, node: ast.AST) -> None:
        if isinstance(node, ast.Dict):
            for key in node.keys:
                if key is not None:
                    self._use_columns(key)
            return
        for const in _string_items(node):
            self.column_uses.append((const.value, const.lineno))

    def visit_Subscript(self, node: ast.Subscript) -> None:
        key = node.slice
        # `.loc[rows, "col"]` / `.loc[:, ["a", "b"]]`: the column part is the second item.
        if isinstance(key, ast.Tuple) and len(key.elts) == 2:
            key = key.elts[1]
        if isinstance(node.ctx, ast.Store):
            self.created_columns.update(c.value for c in _string_items(key))
        else:
            self._use_columns(key)
        self.generic_visit(node)


def _local_modules(root: Path, files: Iterable[Path]) -> set[str]:
    names: set[str] = set()
    for path in files:
        rel = path.relative_to(root)
        if path.suffix == ".py":
            names.add(rel.parts[0] if len(rel.parts) > 1 else path.stem)
    return names


def _check_shadowing(root: Path, files: Iterable[Path]) -> list[Finding]:
    """A package module named like a standard or installed module is refused.

    Such a file makes the gate read `import os` as the package's own harmless module
    while the interpreter gives the real one (already imported by the harness).
    """
    findings, seen = [], set()
    for path in files:
        rel = path.relative_to(root)
        name = rel.parts[0] if len(rel.parts) > 1 else path.stem
        if path.suffix != ".py" or name in seen:
            continue
        seen.add(name)
        if name in sys.stdlib_module_names or name in sys.builtin_module_names or (
                importlib.machinery.PathFinder.find_spec(name) is not None):
            findings.append(Finding(code="shadowed_module", file=rel.as_posix(),
                                    message=f"'{name}' shadows a standard or installed module"))
    return findings


def _check_entry_point(
    root: Path, manifest: PackageManifest, trees: dict[str, ast.Module]
) -> list[Finding]:
    module_path = manifest.entry_module.replace(".", "/")
    candidates = [f"{module_path}.py", f"{module_path}/__init__.py"]
    rel = next((c for c in candidates if c in trees), None)
    if rel is None:
        return [Finding(code="entry_point_missing", file=MANIFEST_FILE,
                        message=f"module '{manifest.entry_module}' not found in the package")]
    functions = [n for n in trees[rel].body
                 if isinstance(n, ast.FunctionDef) and n.name == manifest.entry_function]
    if not functions:
        return [Finding(code="entry_point_missing", file=rel,
                        message=f"no top-level function '{manifest.entry_function}'")]
    args = functions[-1].args
    positional = args.posonlyargs + args.args
    if (len(positional) != 1 or args.defaults or args.vararg or args.kwarg
            or args.kwonlyargs):
        return [Finding(code="entry_point_signature", file=rel, line=functions[-1].lineno,
                        message=f"'{manifest.entry_function}' must take exactly one parameter "
                                "(the mapping of input name to DataFrame)")]
    return []


def check_package(
    package_dir: Path | str, manifest: PackageManifest | None = None
) -> list[Finding]:
    """Run every static check; an empty list (or warnings only) means the package passes."""
    root = Path(package_dir)
    manifest = manifest or load_manifest(root)
    files = package_files(root)
    findings: list[Finding] = []
    trees: dict[str, ast.Module] = {}
    for path in files:
        rel = path.relative_to(root).as_posix()
        if path.suffix in COMPILED_SUFFIXES:
            findings.append(Finding(code="forbidden_file", file=rel,
                                    message="compiled or binary code is not reviewable"))
        elif path.suffix == ".py":
            try:
                trees[rel] = ast.parse(path.read_bytes(), filename=rel)
            except (SyntaxError, ValueError) as exc:
                findings.append(Finding(code="syntax_error", file=rel,
                                        line=getattr(exc, "lineno", None), message=str(exc)))
    local = _local_modules(root, files)
    declared = {c for i in manifest.inputs for c in i.columns}
    known = declared | set(manifest.output.column_names) | {i.name for i in manifest.inputs}
    checkers: list[_Checker] = []
    for rel, tree in trees.items():
        checker = _Checker(rel, local)
        checker.visit(tree)
        checkers.append(checker)
        findings.extend(checker.findings)
        known |= checker.created_columns
    for checker in checkers:
        for column, line in checker.column_uses:
            if column not in known:
                findings.append(Finding(
                    code="undeclared_column", file=checker.file, line=line,
                    message=f"column '{column}' is not a declared input column"))
    findings.extend(_check_shadowing(root, files))
    findings.extend(_check_entry_point(root, manifest, trees))
    return findings


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


# --- owner approval --------------------------------------------------------------------


class PackageApproval(_Model):
    """The data owner's signed statement that one exact package may run on its data."""

    package_name: str
    package_version: str
    package_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    owner: str
    approved_at: str
    # The contract's cap on row-level output (None: none allowed); signed when set.
    row_level_max_rows: int | None = Field(default=None, ge=1)
    signature_b64: str

    def signed_bytes(self) -> bytes:
        return _approval_message(self.model_dump(exclude={"signature_b64"}, exclude_none=True))


def _approval_message(fields: dict[str, str | int]) -> bytes:
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return b"cogov-package-approval-v1\x00" + body.encode("utf-8")


def approve_package(
    package_dir: Path | str, owner_key: Ed25519PrivateKey, owner: str,
    approved_at: datetime | None = None, row_level_max_rows: int | None = None,
) -> PackageApproval:
    """Sign an approval bound to the package's current content hash (and, for row-level
    output, the most rows a run may release)."""
    manifest = load_manifest(package_dir)
    fields = {
        "package_name": manifest.name,
        "package_version": manifest.version,
        "package_sha256": package_hash(package_dir),
        "owner": owner,
        "approved_at": (approved_at or datetime.now(UTC)).isoformat(),
    }
    if row_level_max_rows is not None:
        fields["row_level_max_rows"] = row_level_max_rows
    signature = owner_key.sign(_approval_message(fields))
    return PackageApproval(**fields, signature_b64=base64.b64encode(signature).decode("ascii"))


def verify_approval(
    package_dir: Path | str, approval: PackageApproval | None, owner_public_key: Ed25519PublicKey
) -> str:
    """Return the package hash if `approval` is the owner's valid approval of this content.

    Raises `PackageNotApproved` (no approval, bad signature, other package) or
    `PackageHashMismatch` (the content changed since it was approved).
    """
    if approval is None:
        raise PackageNotApproved("the data owner has not approved this package")
    try:
        owner_public_key.verify(base64.b64decode(approval.signature_b64, validate=True),
                                approval.signed_bytes())
    except (InvalidSignature, ValueError) as exc:
        raise PackageNotApproved("the approval's signature is not the owner's") from exc
    manifest = load_manifest(package_dir)
    if (manifest.name, manifest.version) != (approval.package_name, approval.package_version):
        raise PackageNotApproved(
            f"the approval covers {approval.package_name} {approval.package_version}, "
            f"not {manifest.name} {manifest.version}")
    actual = package_hash(package_dir)
    if actual != approval.package_sha256:
        raise PackageHashMismatch(
            f"package content hash {actual} differs from the approved {approval.package_sha256}")
    return actual
