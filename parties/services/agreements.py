"""Consents and contracts at the serving node (the regulator, which serves the product).

Insurers register the consumers' signed consents; consumers' revocations and
the parties' signed contracts and terminations are registered here too. Each
registration is recorded in the federation's log. The claim product enforces
both through `consent_registry(ctx)` and `contract_book(ctx)` before it
touches any data.
"""

import hashlib
from datetime import UTC, datetime

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from governance import consent as consent_lib
from governance import contracts as contract_lib
from governance.consent import (
    Consent,
    ConsentMismatch,
    ConsentRegistry,
    ConsentRevocation,
)
from governance.contracts import ContractBook, ContractTermination, SignedContract
from parties.ledger.client import append_entry
from parties.runtime.access import Caller, CallerPolicy
from parties.runtime.context import NodeContext
from parties.runtime.errors import IdentityMismatch
from parties.runtime.service import Service
from parties.runtime.store import connect
from parties.runtime.topology import Role

SERVING_ROLE = Role.REGULATOR


def _now() -> datetime:
    return datetime.now(UTC)


def consent_registry(ctx: NodeContext) -> ConsentRegistry:
    """This thread's registry (each on its own connection: requests run in threads)."""
    pepper = hashlib.sha256(b"cogov-consent-pepper|" + ctx.secrets.kek).digest()
    return ctx.per_thread("consent_registry", lambda: ConsentRegistry(
        connect(ctx.paths.db, explicit_transactions=True), pepper))


def contract_book(ctx: NodeContext) -> ContractBook:
    """This thread's contract book (each on its own connection)."""
    return ctx.per_thread("contract_book", lambda: ContractBook(
        connect(ctx.paths.db, explicit_transactions=True), ctx.signing_public_keys()))


def register_consent(ctx: NodeContext, consent: Consent, insurer: str) -> None:
    """Store a consent given to `insurer` (its signature, addressee and window checked).

    The person binding is checked per query: the insurer proves it names the
    person of the commitment, and the operator checks that the consent's key
    is the key delivered for the person behind the queried token.
    """
    if consent.terms.insurer != insurer:
        raise ConsentMismatch(f"consent is given to {consent.terms.insurer}, not {insurer}")
    if consent_registry(ctx).store(consent, _now()):
        append_entry(ctx, "consent_given", consent.log_payload())


class Registered(BaseModel):
    id: str
    status: str


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter(prefix="/v1", tags=["agreements"])

    @router.post("/consents", response_model=Registered)
    def post_consent(
        consent: Consent, caller: Caller = Depends(CallerPolicy("claim", (Role.INSURER,)))
    ) -> Registered:
        """Register a consumer's signed consent given to the calling insurer."""
        register_consent(ctx, consent, caller.name)
        return Registered(id=consent.consent_id, status="registered")

    @router.post("/admin/consents/revocations", response_model=Registered)
    def post_revocation(
        revocation: ConsentRevocation, caller: Caller = Depends(CallerPolicy("admin"))
    ) -> Registered:
        """Register a consumer's signed revocation; it applies from the next query."""
        consent_registry(ctx).revoke(revocation, _now())
        append_entry(ctx, "consent_revoked", revocation.log_payload())
        return Registered(id=revocation.consent_id, status="revoked")

    @router.post("/contracts", response_model=Registered)
    def post_contract(
        contract: SignedContract, caller: Caller = Depends(CallerPolicy("contract"))
    ) -> Registered:
        """Register a contract with the signatures it carries; in force once all parties sign."""
        book = contract_book(ctx)
        before = book.get(contract.contract_id).missing_signatures() if _known(
            book, contract.contract_id) else contract.terms.parties
        stored = book.register(contract, _now())
        missing = stored.missing_signatures()
        if before and not missing:
            append_entry(ctx, "contract_signed", stored.log_payload())
        status = "in force" if not missing else f"awaiting {', '.join(missing)}"
        return Registered(id=stored.contract_id, status=status)

    @router.get("/contracts/{contract_id}", response_model=SignedContract)
    def get_contract(
        contract_id: str, caller: Caller = Depends(CallerPolicy("contract"))
    ) -> SignedContract:
        return contract_book(ctx).get(contract_id)

    @router.post("/contracts/{contract_id}/termination", response_model=Registered)
    def post_termination(
        contract_id: str,
        termination: ContractTermination,
        caller: Caller = Depends(CallerPolicy("contract")),
    ) -> Registered:
        """End a contract at once; the product refuses its queries from now on."""
        if termination.contract_id != contract_id:
            raise IdentityMismatch("the termination names another contract")
        if caller.name not in (termination.party, ctx.name):
            raise IdentityMismatch(f"{caller.name} cannot file {termination.party}'s termination")
        contract_book(ctx).terminate(termination, _now())
        append_entry(ctx, "contract_terminated", {
            "contract_id": contract_id, "party": termination.party, "reason": termination.reason,
        })
        return Registered(id=contract_id, status="terminated")

    return [router]


def _known(book: ContractBook, contract_id: str) -> bool:
    try:
        book.get(contract_id)
    except contract_lib.ContractUnknown:
        return False
    return True


SERVICE = Service(
    name="agreements",
    roles=(SERVING_ROLE,),
    routers=_routes,
    components=(
        (consent_lib.COMPONENT, consent_lib.MIGRATIONS),
        (contract_lib.COMPONENT, contract_lib.MIGRATIONS),
    ),
)
