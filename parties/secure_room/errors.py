"""Typed errors of the secure room."""

from parties.runtime.errors import NodeError


class SecureRoomError(NodeError):
    """Base of every secure-room error."""

    http_status = 400


class SandboxUnavailable(SecureRoomError):
    """This machine cannot build the OS sandbox (bubblewrap missing or namespaces refused)."""

    http_status = 503


class LibraryInvalid(SecureRoomError):
    """The library directory is missing, malformed, or lacks a declared table or column."""

    http_status = 422


class LibraryNotDeclared(SecureRoomError):
    """The package does not declare this library tier for one of its inputs."""

    http_status = 403
