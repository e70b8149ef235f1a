"""The log's first checkpoint, pinned when the federation is set up.

`cogov pki init` (`parties.ledger.first_checkpoint`) has the operator append the log's
first entry (`log_started`, naming the federation) and writes the checkpoint of that
one-entry tree, signed by the log, into every node's directory (`<node>/log_pin.json`: the
C2SP note and the signed tree head), which travels with the node's certificate. Each
witness starts from it instead of trusting the first head it is shown (a log that rewrote
its start is refused and recorded from the first poll), the insurer's log view starts
from it, and `cogov ledger audit` and `verify` require the history to extend it. Without a
pin (a federation whose log predates it) witnesses and clients fall back to trusting the
first head they see (SECURITY.md).
"""

from pydantic import BaseModel, ConfigDict

from governance.ledger import SignedTreeHead, Witness
from parties.runtime.state import NodePaths

PIN_FILE = "log_pin.json"


class LogPin(BaseModel):
    """The log's first checkpoint: the note for checkpoint clients, the head for witnesses."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint: str
    tree_head: SignedTreeHead


def start_from_pin(witness: Witness, log_id: str, pin: LogPin | None) -> None:
    """A witness that has witnessed nothing yet starts from the pinned head (it checks the
    log's signature), so the first head it is shown must be proven to extend it."""
    if pin is not None and witness.latest(log_id) is None:
        witness.cosign(pin.tree_head)


def load_pin(paths: NodePaths) -> LogPin | None:
    """The pinned first checkpoint in a node's directory, if the federation pinned one."""
    path = paths.root / PIN_FILE
    return LogPin.model_validate_json(path.read_text()) if path.exists() else None
