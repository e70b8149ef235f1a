"""The serving node's books of agreements: its consent registry and its contract book.

The claim product checks both before it touches any data; each request thread
gets its own on a connection of its own.
"""

import hashlib

from governance.consent import ConsentRegistry
from governance.contracts import ContractBook
from parties.runtime.context import NodeContext
from parties.runtime.store import connect


def consent_registry(ctx: NodeContext) -> ConsentRegistry:
    """This thread's consent registry."""
    pepper = hashlib.sha256(b"cogov-consent-pepper|" + ctx.secrets.kek).digest()
    return ctx.per_thread(ConsentRegistry, lambda: ConsentRegistry(
        connect(ctx.paths.db, explicit_transactions=True), pepper))


def contract_book(ctx: NodeContext) -> ContractBook:
    """This thread's contract book."""
    return ctx.per_thread(ContractBook, lambda: ContractBook(
        connect(ctx.paths.db, explicit_transactions=True), ctx.signing_public_keys()))
