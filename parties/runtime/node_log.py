"""Structured node logs: one JSON object per line, carrying the request id.

The request id lives in a context variable, so every line written while a
request is handled (and every call the node makes on its behalf) carries it.
"""

import contextvars
import datetime as dt
import json
import threading
import uuid
from pathlib import Path
from typing import Any

REQUEST_ID_HEADER = "X-Request-ID"
NODE_HEADER = "X-Cogov-Node"

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "cogov_request_id", default=None
)


def new_request_id() -> str:
    return uuid.uuid4().hex


class NodeLog:
    """Append-only JSON-lines log of one node."""

    def __init__(self, path: Path, node: str) -> None:
        self.path = path
        self.node = node
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def event(self, event: str, **fields: Any) -> None:
        record = {
            "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "node": self.node,
            "event": event,
            "request_id": fields.pop("request_id", None) or current_request_id.get(),
            **fields,
        }
        line = json.dumps(record, default=str, ensure_ascii=False)
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    """All complete records of a node log (for tests, `cogov logs` and audits).

    A running node may be halfway through writing its last line; only lines that end in a
    newline are records.
    """
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line]
