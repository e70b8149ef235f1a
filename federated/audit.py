"""A ClientApp mod that writes down everything a hospital sends out.

When the node config carries `audit-dir` (or the environment `COGOV_FL_AUDIT_DIR`),
every outgoing Message is stored there as one `.npz` file: each array of each
ArrayRecord, each config value (bytes and numbers) and each metric. A hospital can
then check, offline, that nothing but model parameters and aggregate metrics left.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

AUDIT_DIR_KEY = "audit-dir"
AUDIT_DIR_ENV = "COGOV_FL_AUDIT_DIR"


def record_outbound_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Pass the message on, then store the reply's content if auditing is switched on."""
    reply = call_next(msg, ctxt)
    target = str(ctxt.node_config.get(AUDIT_DIR_KEY, "") or os.environ.get(AUDIT_DIR_ENV, ""))
    if target:
        write_outbound_record(
            Path(target),
            reply.content if reply.has_content() else RecordDict(),
            message_type=reply.metadata.message_type,
            group_id=reply.metadata.group_id,
            node_id=reply.metadata.src_node_id,
            partition=ctxt.node_config.get("partition-id"),
            has_error=reply.has_error(),
        )
    return reply


def write_outbound_record(
    directory: Path,
    content: RecordDict,
    *,
    message_type: str = "",
    group_id: str = "",
    node_id: int = 0,
    partition: object = None,
    has_error: bool = False,
) -> Path:
    """Store one outgoing message's content as `<node>-<uuid>.npz` (atomic rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    entries: list[dict[str, object]] = []
    for record_name, record in content.array_records.items():
        for key, array in record.items():
            name = f"a{len(arrays)}"
            arrays[name] = array.numpy()
            entries.append({"kind": "array", "record": record_name, "key": key, "npz": name})
    for kind, records in (("config", content.config_records), ("metric", content.metric_records)):
        for record_name, record in records.items():
            for key, value in record.items():
                items = value if isinstance(value, list) else [value]
                for item_index, item in enumerate(items):
                    name = f"a{len(arrays)}"
                    arrays[name] = _as_array(item)
                    entries.append({"kind": kind, "record": record_name, "key": key,
                                    "item": item_index, "npz": name})
    index = {
        "message_type": message_type,
        "group_id": group_id,
        "src_node_id": node_id,
        "partition": partition,
        "has_error": has_error,
        "entries": entries,
    }
    arrays["index"] = np.frombuffer(json.dumps(index).encode(), dtype=np.uint8)
    path = directory / f"{node_id}-{uuid.uuid4().hex}.npz"
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as handle:
        np.savez(handle, **arrays)
    tmp.replace(path)
    return path


def read_outbound_records(directory: Path) -> list[tuple[dict, dict[str, np.ndarray]]]:
    """Load every record written by `record_outbound_mod`: (index, arrays) pairs."""
    out = []
    for path in sorted(directory.glob("*.npz")):
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        index = json.loads(arrays.pop("index").tobytes().decode())
        out.append((index, arrays))
    return out


def _as_array(value: object) -> np.ndarray:
    if isinstance(value, bytes):
        return np.frombuffer(value, dtype=np.uint8)
    if isinstance(value, str):
        return np.frombuffer(value.encode(), dtype=np.uint8)
    return np.asarray(value)
