"""The xID keys behind shared domains, where their nodes keep them.

k1 lives at the health authority: generated on first use, sealed under the node's
KEK, never sent anywhere; everything that derives or sends p1 = k1·H(id) holds
`level1_lock`, so a k1 rotation never races with it. Each shared domain d has its
own k2[d] at the operator, kept under `domain_key_name(d)`. Bulk group operations
with either run on the node's worker pool.
"""

import threading

from mpc import xid
from mpc.hazmat.parallel import usable_cores
from parties.runtime.context import NodeContext

K1_NAME = "xid:k1"


def level1_key(ctx: NodeContext) -> xid.XidKey:
    """k1, generated on first use."""
    return ctx.secrets.xid_key(K1_NAME, create=True)


class Level1Lock:
    def __init__(self) -> None:
        self.lock = threading.Lock()


def level1_lock(ctx: NodeContext) -> threading.Lock:
    """Held by whatever derives or sends p1, so a k1 rotation never races with it."""
    return ctx.component(Level1Lock, Level1Lock).lock


def domain_key_name(domain_id: str) -> str:
    """The name under which the operator keeps k2 of shared domain `domain_id`."""
    return f"domain:{domain_id}"


def xid_pool(ctx: NodeContext) -> xid.WorkerPool | None:
    """The node's worker processes for bulk group operations (None on one core)."""
    if usable_cores() < 2:
        return None
    return ctx.component(xid.WorkerPool, xid.WorkerPool)
