"""Packages and libraries as JSON on the wire, and the hashes both sides recompute."""

import base64
import binascii
import hashlib
import json
from pathlib import Path
from typing import Any

from governance.packages import PackageInvalid, package_files
from parties.secure_room.api import WireFile

LIBRARY_HASH_DOMAIN = b"cogov-library-v1\x00"


def files_to_wire(root: Path, files: list[Path]) -> list[WireFile]:
    return [WireFile(path=p.relative_to(root).as_posix(),
                     content_b64=base64.b64encode(p.read_bytes()).decode("ascii"))
            for p in files]


def package_to_wire(package_dir: Path | str) -> list[WireFile]:
    """Exactly the files the package hash covers (no __pycache__, no package.sha256)."""
    root = Path(package_dir)
    return files_to_wire(root, package_files(root))


def library_to_wire(directory: Path) -> list[WireFile]:
    """A library's flat files: library.json and its tables."""
    return files_to_wire(directory, sorted(p for p in directory.iterdir() if p.is_file()))


def write_wire_files(files: list[WireFile], target: Path, *, max_files: int,
                     max_bytes: int) -> None:
    """Decode files into the empty directory `target`; malformed input raises PackageInvalid."""
    if not files or len(files) > max_files:
        raise PackageInvalid(f"expected 1 to {max_files} files, got {len(files)}")
    seen: set[str] = set()
    total = 0
    decoded: list[tuple[str, bytes]] = []
    for item in files:
        parts = item.path.split("/")
        if item.path in seen or any(p in ("..", ".", "__pycache__") for p in parts):
            raise PackageInvalid(f"file path {item.path!r} is duplicated or not allowed")
        seen.add(item.path)
        try:
            data = base64.b64decode(item.content_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PackageInvalid(f"{item.path}: content is not base64") from exc
        total += len(data)
        if total > max_bytes:
            raise PackageInvalid(f"files exceed {max_bytes} bytes")
        decoded.append((item.path, data))
    for rel, data in decoded:
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def library_hash(directory: Path | str) -> str:
    """SHA-256 over a library directory's files (length-prefixed names and bytes)."""
    root = Path(directory)
    digest = hashlib.sha256(LIBRARY_HASH_DOMAIN)
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        name, data = path.name.encode(), path.read_bytes()
        digest.update(len(name).to_bytes(8, "big") + name)
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def records_sha256(records: list[dict] | dict | None) -> str:
    """The hash both sides compute over a released output (canonical JSON)."""
    body = json.dumps(records, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def report_sha256(report: dict[str, Any]) -> str:
    """The hash of a report both sides recompute (canonical JSON of its fields)."""
    return records_sha256(report)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
