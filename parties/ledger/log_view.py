"""A client's own view of the federation's log: receipts checked against one history.

A node that takes answers with receipts (the insurer) keeps, in `<node>/log_view.json`,
starting from the log's first checkpoint pinned at setup, the largest checkpoint the log
showed it and the latest checkpoint every witness cosigned,
as the signed notes themselves (checked again when loaded), and the entries whose receipts
no cosigned checkpoint covers yet.

- `accept` checks a receipt: the log's signature on its checkpoint, the entry's audit path
  to that root, and that the checkpoint is one history with the largest one seen before (a
  consistency proof from the log between the two sizes). A bad receipt is refused with
  `ReceiptInvalid`, a fork (or a log that will not prove one history) with `LogForked`;
  neither changes the view.
- `refresh` fetches the cosigned checkpoint (`CHECKPOINT`), requires every witness's
  cosignature and proves it one history with the largest checkpoint seen. Every receipt of
  an entry below its size is then against a cosigned checkpoint (the two trees agree on
  their common prefix): no longer pending.
- `confirm` refreshes until no receipt is pending, within a bound.

Only the federation CA's certified public keys are trusted, never a key an answer carries.
"""

import json
import os
import time
from pathlib import Path

from governance.ledger import LedgerError
from governance.ledger.checkpoint import Checkpoint, origin_of, verify_checkpoint
from governance.ledger.merkle import verify_consistency
from governance.ledger.proofs import Receipt, verify_receipt
from governance.ledger.signing import PublicKeyLike
from parties.ledger.api import CHECKPOINT, CONSISTENCY, LogForked, ReceiptInvalid
from parties.runtime.client import NodeClient
from parties.runtime.errors import RemoteError

VIEW_FILE = "log_view.json"
CONFIRM_POLL_S = 0.2


class LogView:
    """The largest and the latest cosigned checkpoint of the log this node has seen."""

    def __init__(self, path: Path, client: NodeClient, operator: str, log_key: PublicKeyLike,
                 witnesses: dict[str, PublicKeyLike], pin: str | None = None) -> None:
        """`pin`: the log's first checkpoint pinned at setup (`parties.ledger.pin`), where
        a view with nothing saved starts: every checkpoint shown must extend it."""
        self.path = path
        self._client = client
        self._operator = operator
        self._log_key = log_key
        self._witnesses = witnesses
        self.origin = origin_of(operator, log_key)
        self.largest: Checkpoint | None = None
        self.cosigned: Checkpoint | None = None
        self.pending: list[int] = []
        self._notes: dict[str, str] = {}
        if path.exists():
            self._load(json.loads(path.read_text()))
        elif pin is not None:
            self._load({"largest": pin})

    def _load(self, saved: dict) -> None:
        for field, required in (("largest", 0), ("cosigned", None)):
            if saved.get(field):
                setattr(self, field, verify_checkpoint(
                    saved[field], self.origin, self._log_key, self._witnesses,
                    required=required))
                self._notes[field] = saved[field]
        self.pending = [int(i) for i in saved.get("pending", [])]

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({**self._notes, "pending": self.pending}, out)
        os.replace(tmp, self.path)

    def accept(self, receipt: Receipt, leaf: bytes) -> Checkpoint:
        """Check `receipt` of `leaf` against the view, then take its checkpoint into it."""
        try:
            checked = verify_receipt(receipt, leaf, self.origin, self._log_key,
                                     self._witnesses)
        except LedgerError as exc:
            raise ReceiptInvalid(f"the receipt does not prove its entry: {exc}") from None
        self._one_history(self.largest, checked)
        if self.largest is None or checked.tree_size > self.largest.tree_size:
            self.largest, self._notes["largest"] = checked, receipt.checkpoint
        if self.cosigned is None or receipt.index >= self.cosigned.tree_size:
            self.pending.append(receipt.index)
        self._save()
        return checked

    def refresh(self) -> Checkpoint:
        """Fetch the log's cosigned checkpoint, prove it extends the view, and settle the
        receipts it covers."""
        note = self._client.call(self._operator, CHECKPOINT).decode()
        try:
            checked = verify_checkpoint(note, self.origin, self._log_key, self._witnesses)
        except LedgerError as exc:
            raise ReceiptInvalid(f"the log's checkpoint is not cosigned: {exc}") from None
        # Every checkpoint in the view was proven one history with the largest at the time,
        # and the largest only grows along proofs: one proof against it covers them all.
        self._one_history(self.largest, checked)
        if self.cosigned is None or checked.tree_size >= self.cosigned.tree_size:
            self.cosigned, self._notes["cosigned"] = checked, note
        if self.largest is None or checked.tree_size > self.largest.tree_size:
            self.largest, self._notes["largest"] = checked, note
        self.pending = [i for i in self.pending if i >= self.cosigned.tree_size]
        self._save()
        return checked

    def confirm(self, timeout_s: float) -> bool:
        """Refresh until every receipt taken is against a cosigned checkpoint (True), or
        `timeout_s` passed (False: some still wait for the witnesses)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.refresh()
            if not self.pending or time.monotonic() >= deadline:
                return not self.pending
            time.sleep(CONFIRM_POLL_S)

    def _one_history(self, known: Checkpoint | None, shown: Checkpoint) -> None:
        """`LogForked` unless the log proves `known` and `shown` one history."""
        if known is None:
            return
        small, large = sorted((known, shown), key=lambda c: c.tree_size)
        if small.tree_size == large.tree_size:
            consistent = small.root == large.root
        elif small.tree_size == 0:
            consistent = True
        else:
            try:
                proof = self._client.call(self._operator, CONSISTENCY, query={
                    "first": small.tree_size, "second": large.tree_size})
                path = [bytes.fromhex(p) for p in proof.path]
            except (RemoteError, ValueError) as exc:
                raise LogForked(f"the log will not prove its checkpoints of sizes "
                                      f"{small.tree_size} and {large.tree_size} one history: "
                                      f"{exc}") from None
            consistent = verify_consistency(small.tree_size, large.tree_size, small.root,
                                            large.root, path)
        if not consistent:
            raise LogForked(f"the log's checkpoints of sizes {small.tree_size} and "
                                  f"{large.tree_size} are not one history (a fork)")
