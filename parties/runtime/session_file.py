"""Where a local administrator's second-factor session token is kept, and the header that
carries it (the node side is `parties.runtime.admin_session`)."""

from pathlib import Path

from parties.runtime.state import NodePaths, write_private

SESSION_HEADER = "X-Cogov-Admin-Session"


def session_file(paths: NodePaths) -> Path:
    return paths.root / "admin.session"


def save_session(paths: NodePaths, token: str) -> None:
    write_private(session_file(paths), token.encode())


def saved_session(paths: NodePaths) -> str | None:
    path = session_file(paths)
    return path.read_text().strip() if path.exists() else None
