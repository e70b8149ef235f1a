"""A curious regulator: the real regulator node, keeping a record of everything its
claim-check side receives.

    python -m tests.curious_regulator --name regulator --topology T --state S

It runs `parties.node` unchanged, with three observers wrapped around the code that
receives: the `ss` follower's batches (`FollowerHost._inputs_for`: the batch id, which
names the share table, and every slot's row number), the share tables the operator
pushes (`FollowerHost.keep_table`: table id, shared domain, rows) and the product
service's relay of each request (`compute_at_operator`: request id, insurer, each
claim's consent id). Each observation is one JSON line in `regulator_view.jsonl` in the
node's directory. The consents it registers are in its own store already. This is the
regulator's full view of the claim check: a semi-honest regulator may keep all of it.
"""

import json
import sys
import threading
from pathlib import Path
from typing import Any

from parties import node
from parties.claims import service, sessions
from parties.runtime.node_log import current_request_id
from parties.runtime.state import StateDir

VIEW_FILE = "regulator_view.jsonl"


def view_path(state: StateDir, name: str) -> Path:
    return state.node(name).root / VIEW_FILE


def read_view(state: StateDir, name: str = "regulator") -> list[dict[str, Any]]:
    path = view_path(state, name)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()

    def __call__(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        with self.lock, self.path.open("a", encoding="utf-8") as out:
            out.write(line)


def install(record: _Recorder) -> None:
    inputs_for = sessions.FollowerHost._inputs_for
    keep_table = sessions.FollowerHost.keep_table
    compute_at_operator = service.compute_at_operator

    def observed_inputs(self: sessions.FollowerHost, request: Any) -> Any:
        record({"kind": "batch", "batch_id": request.batch_id,
                "row_index": request.row_index.tolist()})
        return inputs_for(self, request)

    def observed_table(self: sessions.FollowerHost, table_id: str, domain_id: str,
                       blob: bytes) -> int:
        rows = keep_table(self, table_id, domain_id, blob)
        record({"kind": "share_table", "table_id": table_id, "domain": domain_id,
                "rows": rows})
        return rows

    def observed_relay(ctx: Any, insurer: str, body: Any, consents: list) -> Any:
        record({"kind": "request", "request_id": current_request_id.get(),
                "insurer": insurer, "mode": body.mode,
                "consent_ids": [c.consent_id for c in body.claims]})
        return compute_at_operator(ctx, insurer, body, consents)

    sessions.FollowerHost._inputs_for = observed_inputs
    sessions.FollowerHost.keep_table = observed_table
    service.compute_at_operator = observed_relay


def main() -> None:
    args = sys.argv[1:]
    name, state = args[args.index("--name") + 1], StateDir(Path(args[args.index("--state") + 1]))
    install(_Recorder(view_path(state, name)))
    node.main()


if __name__ == "__main__":
    main()
