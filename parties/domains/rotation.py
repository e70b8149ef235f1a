"""Rotation of a shared domain's key k2[d] at the operator, where it is generated, kept and used.

The operator holds both versions of k2[d], so it moves every stored token of the
shared domain to the new version in place: T' = (new·old^-1)·T (`mpc.xid.rotate_tokens`).
The re-keyed tokens and the new sealed key are written in one SQLite
transaction under the store lock (ingest and OPRF key reads wait), then
`key_rotated` is logged, and the new version's commitment k2[d]'·G is published
(`parties.domains.commitments`). The old version is overwritten: tokens obtained before
the rotation no longer match anything, which is the point of rotating, and a
leak of such old tokens can no longer be traced to the shared domain.

The level-1 key k1 rotates at the health authority: `parties.domains.level1_rotation`.
"""

from fastapi import APIRouter

from governance.ledger.events import is_known_kind, register_event_kind
from mpc import xid
from parties.domains.api import ROTATE_DOMAIN_KEY, SharedDomainKeyRotated
from parties.domains.commitments import publish_commitment
from parties.domains.keys import domain_key_name, xid_pool
from parties.domains.registry import bump_token_epochs, get_domain
from parties.domains.service import DomainId
from parties.ledger.client import append_entry
from parties.runtime.access import Caller
from parties.runtime.context import NodeContext
from parties.runtime.mount import mount
from parties.runtime.service import Service
from parties.runtime.topology import Role

KEY_ROTATED = "key_rotated" if is_known_kind("key_rotated") else register_event_kind(
    "key_rotated")


def rotate_domain_key(ctx: NodeContext, domain_id: str) -> SharedDomainKeyRotated:
    """Replace k2[d] by a fresh version and re-key the shared domain's tokens, all or nothing.

    Raises `UnknownDomain` (404) or `DomainDeleted` (410) and changes nothing for a
    shared domain that does not exist or was deleted.
    """
    key_name = domain_key_name(domain_id)
    with ctx.store.lock:
        domain = get_domain(ctx, domain_id)
        old = ctx.secrets.xid_key(key_name)
        new = old.rotate()
        conn = ctx.store.conn
        rows = conn.execute("SELECT visit_ref, token FROM domain_tokens WHERE domain_id = ?",
                            (domain_id,)).fetchall()
        # One group operation per person, not per visit.
        distinct = list(dict.fromkeys(bytes(t) for _, t in rows))
        moved = dict(zip(distinct, xid.rotate_tokens(old, new, distinct, pool=xid_pool(ctx)),
                         strict=True))
        with conn:
            conn.executemany(
                "UPDATE domain_tokens SET token = ? WHERE domain_id = ? AND visit_ref = ?",
                [(moved[bytes(t)], domain_id, bytes(r)) for r, t in rows],
            )
            bump_token_epochs(conn, domain_id)
            # Last statement of the unit: its commit is the commit of the token updates too,
            # and a failure rolls both back.
            ctx.secrets.replace_xid_key(key_name, new)
    result = SharedDomainKeyRotated(domain_id=domain_id, key_id=key_name, old_version=old.version,
                              new_version=new.version, tokens=len(rows), persons=len(distinct))
    append_entry(ctx, KEY_ROTATED, {
        "domain": domain_id, "key_id": key_name, "old_version": old.version,
        "new_version": new.version, "tokens": len(rows), "persons": len(distinct),
    })
    ctx.log.event("key_rotated", domain=domain_id, old_version=old.version,
                  new_version=new.version, tokens=len(rows))
    publish_commitment(ctx, new, domain=domain_id, scenario=domain.scenario,
                       data_user=domain.data_user)
    return result


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, ROTATE_DOMAIN_KEY)
    def post_rotate(domain_id: DomainId, caller: Caller) -> SharedDomainKeyRotated:
        """Rotate the shared domain's key k2[d]; tokens obtained before no longer match."""
        return rotate_domain_key(ctx, domain_id)

    return [router]


OPERATOR_KEY_ROTATION_SERVICE = Service(
    name="key_rotation",
    roles=(Role.OPERATOR,),
    routers=_routes,
)
