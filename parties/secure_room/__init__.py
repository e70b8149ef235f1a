"""The secure room: algorithm packages validated and run in an OS sandbox."""

from parties.secure_room.errors import (
    LibraryInvalid,
    LibraryNotDeclared,
    SandboxUnavailable,
    SecureRoomError,
)
from parties.secure_room.room import PackageRun, ValidationReport, run_package
from parties.secure_room.sandbox import SandboxLimits, sandbox_available, sandbox_command

__all__ = [
    "LibraryInvalid",
    "LibraryNotDeclared",
    "PackageRun",
    "SandboxLimits",
    "SandboxUnavailable",
    "SecureRoomError",
    "ValidationReport",
    "run_package",
    "sandbox_available",
    "sandbox_command",
]
