"""Algorithm packages: manifest validation, content hash, static checks, owner approval."""

import hashlib
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from governance.packages import (
    HASH_FILE,
    PackageExists,
    PackageHashMismatch,
    PackageInvalid,
    PackageNotApproved,
    approve_package,
    check_package,
    has_errors,
    init_package,
    load_manifest,
    package_hash,
    verify_approval,
    write_package_hash,
)

CLAIM_PACKAGE = Path(__file__).resolve().parents[1] / "scenarios/claim_check/claim_package"

MANIFEST = """\
name = "probe"
version = "0.1.0"
entry_point = "main:run"

[[inputs]]
name = "visits"
dataset = "visits"
libraries = ["sample"]
columns = ["hospital_id", "total_fen"]

[output]
disclosure = "model"

[[output.columns]]
name = "hospital_id"
type = "string"
"""


def make_package(root: Path, code: str, manifest: str = MANIFEST) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.toml").write_text(manifest)
    (root / "main.py").write_text(textwrap.dedent(code))
    return root


def codes(findings) -> set[str]:
    return {f.code for f in findings}


def test_init_scaffold_is_valid_and_clean(tmp_path):
    target = init_package(tmp_path / "pkg", "hospital-totals")
    manifest = load_manifest(target)
    assert manifest.entry_point == "hospital_totals:run"
    assert manifest.output.disclosure == "aggregate"
    assert check_package(target) == []
    with pytest.raises(PackageExists):
        init_package(target, "again")


def test_manifest_errors_name_the_field(tmp_path):
    bad_library = MANIFEST.replace('libraries = ["sample"]', 'libraries = ["production"]')
    make_package(tmp_path / "a", "def run(t):\n    return t\n", bad_library)
    with pytest.raises(PackageInvalid, match=r"inputs\.0\.libraries\.0"):
        load_manifest(tmp_path / "a")
    aggregate = MANIFEST.replace('disclosure = "model"', 'disclosure = "aggregate"')
    make_package(tmp_path / "b", "def run(t):\n    return t\n", aggregate)
    with pytest.raises(PackageInvalid, match="count_column"):
        load_manifest(tmp_path / "b")
    make_package(tmp_path / "c", "", MANIFEST.replace('entry_point = "main:run"', ""))
    with pytest.raises(PackageInvalid, match="entry_point"):
        load_manifest(tmp_path / "c")
    (tmp_path / "d").mkdir()
    with pytest.raises(PackageInvalid, match=r"manifest\.toml"):
        load_manifest(tmp_path / "d")


def test_a_verdict_needs_exactly_one_claims_input(tmp_path):
    verdict = MANIFEST.replace('disclosure = "model"', 'disclosure = "verdict"').replace(
        'name = "hospital_id"\ntype = "string"', 'name = "claim_id"\ntype = "string"')
    make_package(tmp_path / "a", "", verdict)
    with pytest.raises(PackageInvalid, match="exactly one input declaring 'claim_id'"):
        load_manifest(tmp_path / "a")
    make_package(tmp_path / "b", "", verdict.replace('"hospital_id", "total_fen"]',
                                                     '"claim_id", "total_fen"]'))
    assert load_manifest(tmp_path / "b").claims_input == "visits"


def test_hash_follows_the_published_canonical_listing(tmp_path):
    pkg = make_package(tmp_path / "p", "def run(tables):\n    return tables['visits']\n")
    (pkg / "lib").mkdir()
    (pkg / "lib" / "util.py").write_bytes(b"X = 1\n")
    # Independent computation of the documented format.
    expected = hashlib.sha256(b"cogov-package-v1\x00")
    for rel in ["lib/util.py", "main.py", "manifest.toml"]:
        data = (pkg / rel).read_bytes()
        expected.update(len(rel).to_bytes(8, "big") + rel.encode())
        expected.update(len(data).to_bytes(8, "big") + data)
    assert package_hash(pkg) == expected.hexdigest()


def test_hash_ignores_its_own_file_and_bytecode_caches(tmp_path):
    pkg = make_package(tmp_path / "p", "def run(tables):\n    return tables['visits']\n")
    before = package_hash(pkg)
    assert write_package_hash(pkg) == before
    assert (pkg / HASH_FILE).read_text().strip() == before
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"junk")
    assert package_hash(pkg) == before
    (pkg / "notes.txt").write_text("x")
    assert package_hash(pkg) != before


def test_symlinks_are_refused(tmp_path):
    pkg = make_package(tmp_path / "p", "def run(tables):\n    return tables['visits']\n")
    (pkg / "link.py").symlink_to("/etc/hostname")
    with pytest.raises(PackageInvalid, match="symlink"):
        package_hash(pkg)


def test_claim_package_passes_static_checks():
    assert check_package(CLAIM_PACKAGE) == []


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("import os\ndef run(t):\n    return t\n", "forbidden_import"),
        ("import socket\ndef run(t):\n    return t\n", "forbidden_import"),
        ("from subprocess import run as r\ndef run(t):\n    return t\n", "forbidden_import"),
        ("import numpy.ctypeslib\ndef run(t):\n    return t\n", "forbidden_import"),
        ("from pandas import read_csv\ndef run(t):\n    return t\n", "forbidden_import"),
        ("def run(t):\n    return open('/etc/passwd').read()\n", "forbidden_call"),
        ("def run(t):\n    return eval('1')\n", "forbidden_call"),
        ("def run(t):\n    exec('x=1')\n", "forbidden_call"),
        ("def run(t):\n    return __import__('os')\n", "forbidden_call"),
        ("import math\ndef run(t):\n    return getattr(math, 'pi')\n", "forbidden_call"),
        ("def run(t, name='x'):\n    return getattr(t, name)\n", "entry_point_signature"),
        ("def run(t):\n    n = 'x'\n    return getattr(t, n)\n", "forbidden_call"),
        ("def run(t):\n    return ().__class__.__bases__\n", "forbidden_attribute"),
        ("def run(t):\n    return __builtins__\n", "forbidden_name"),
        ("import pandas as pd\ndef run(t):\n    return pd.read_csv('x')\n", "forbidden_attribute"),
        ("def run(t):\n    t['visits'].to_csv('/out/x')\n", "forbidden_attribute"),
        ("def run(t):\n    return t['visits']['national_id']\n", "undeclared_column"),
        ("def run(t):\n    return t['visits'].groupby('sex').size()\n", "undeclared_column"),
        ("def run(t):\n    return t['visits'].merge(t['visits'], on=['name'])\n",
         "undeclared_column"),
        ("def run(t):\n    return t['visits'].loc[:, ['phone']]\n", "undeclared_column"),
        ("def main(t):\n    return t\n", "entry_point_missing"),
        ("def run(a, b):\n    return a\n", "entry_point_signature"),
        ("def run(*tables):\n    return tables\n", "entry_point_signature"),
        ("def run(t):\n    return t[\n", "syntax_error"),
    ],
)
def test_static_checks_flag(tmp_path, code, expected):
    pkg = make_package(tmp_path / "p", code)
    findings = check_package(pkg)
    assert expected in codes(findings), findings
    assert has_errors(findings)
    assert all(f.file and f.message for f in findings)


def test_static_checks_accept_created_and_declared_columns(tmp_path):
    code = """\
    import pandas as pd
    from collections import Counter


    def run(tables):
        visits = tables["visits"]
        visits["double"] = visits["total_fen"] * 2
        renamed = visits.rename(columns={"total_fen": "fen"})
        summary = renamed.groupby("hospital_id", as_index=False).agg(n=("fen", "size"))
        summary = summary.assign(k=1).sort_values(["hospital_id", "n", "k"])
        Counter(visits["hospital_id"])
        return pd.DataFrame({"hospital_id": summary["hospital_id"]})
    """
    assert check_package(make_package(tmp_path / "p", code)) == []


def test_compiled_files_are_refused(tmp_path):
    pkg = make_package(tmp_path / "p", "def run(t):\n    return t\n")
    (pkg / "helper.pyc").write_bytes(b"\x00" * 16)
    assert "forbidden_file" in codes(check_package(pkg))


# --- owner approval ----------------------------------------------------------------------


@pytest.fixture
def owner_key():
    return Ed25519PrivateKey.generate()


def test_approved_package_verifies(tmp_path, owner_key):
    pkg = make_package(tmp_path / "p", "def run(tables):\n    return tables['visits']\n")
    approval = approve_package(pkg, owner_key, "health-authority")
    assert approval.package_sha256 == package_hash(pkg)
    assert verify_approval(pkg, approval, owner_key.public_key()) == package_hash(pkg)


def test_never_approved_package_is_refused(tmp_path, owner_key):
    pkg = make_package(tmp_path / "p", "def run(tables):\n    return tables['visits']\n")
    with pytest.raises(PackageNotApproved) as caught:
        verify_approval(pkg, None, owner_key.public_key())
    assert caught.value.http_status == 403


def test_one_changed_byte_is_refused(tmp_path, owner_key):
    pkg = make_package(tmp_path / "p", "def run(tables):\n    return tables['visits']\n")
    approval = approve_package(pkg, owner_key, "health-authority")
    code = bytearray((pkg / "main.py").read_bytes())
    code[-2] ^= 0x01  # one bit of one byte
    (pkg / "main.py").write_bytes(bytes(code))
    with pytest.raises(PackageHashMismatch):
        verify_approval(pkg, approval, owner_key.public_key())


def test_added_file_is_refused(tmp_path, owner_key):
    pkg = make_package(tmp_path / "p", "def run(tables):\n    return tables['visits']\n")
    approval = approve_package(pkg, owner_key, "health-authority")
    (pkg / "extra.py").write_text("X = 1\n")
    with pytest.raises(PackageHashMismatch):
        verify_approval(pkg, approval, owner_key.public_key())


def test_forged_or_edited_approval_is_refused(tmp_path, owner_key):
    pkg = make_package(tmp_path / "p", "def run(tables):\n    return tables['visits']\n")
    approval = approve_package(pkg, owner_key, "health-authority")
    other = Ed25519PrivateKey.generate()
    with pytest.raises(PackageNotApproved):
        verify_approval(pkg, approve_package(pkg, other, "health-authority"),
                        owner_key.public_key())
    (pkg / "main.py").write_text("def run(tables):\n    return None\n")
    # Re-pointing the approval at the new hash breaks the owner's signature.
    edited = approval.model_copy(update={"package_sha256": package_hash(pkg)})
    with pytest.raises(PackageNotApproved) as caught:
        verify_approval(pkg, edited, owner_key.public_key())
    assert not isinstance(caught.value, PackageHashMismatch)
