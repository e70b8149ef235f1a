"""Consents and contracts at the serving node (the regulator, which serves the product).

Insurers register the consumers' signed consents; consumers' revocations and
the parties' signed contracts and terminations are registered here too. Each
registration is recorded in the federation's log. The claim product enforces
both through `parties.agreements.books` before it touches any data.
"""

import hashlib
from datetime import UTC, datetime

from fastapi import APIRouter

from governance import consent as consent_lib
from governance import contracts as contract_lib
from governance.consent import Consent, ConsentMismatch, ConsentRevocation
from governance.contracts import ContractBook, ContractTermination, SignedContract
from parties.agreements.api import (
    CONTRACT,
    DATA_OWNER_ROLE,
    DATA_USER_ROLES,
    REGISTER_CONSENT,
    REGISTER_CONTRACT,
    REVOKE_CONSENT,
    SERVING_ROLE,
    TERMINATE_CONTRACT,
    ContractSignatoriesMissing,
    DataOwnerShareMissing,
    Registered,
    required_signatories,
)
from parties.agreements.books import consent_registry, contract_book
from parties.ledger.client import append_entry
from parties.runtime.access import Caller
from parties.runtime.context import NodeContext
from parties.runtime.errors import IdentityMismatch
from parties.runtime.mount import mount
from parties.runtime.service import Service


def _now() -> datetime:
    return datetime.now(UTC)


def register_consent(ctx: NodeContext, consent: Consent, insurer: str) -> None:
    """Store a consent given to `insurer` (its signature, addressee and window checked).

    The person binding is checked per query, by the operator: the consent's key must be
    the key the health authority delivered for the person behind the queried token
    (`governance.consent`: the key is the only binding).
    """
    if consent.terms.insurer != insurer:
        raise ConsentMismatch(f"consent is given to {consent.terms.insurer}, not {insurer}")
    if consent_registry(ctx).store(consent, _now()):
        append_entry(ctx, "consent_given", consent.log_payload())


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, REGISTER_CONSENT)
    def post_consent(body: Consent, caller: Caller) -> Registered:
        """Register a consumer's signed consent given to the calling insurer."""
        register_consent(ctx, body, caller.name)
        return Registered(id=body.consent_id, status="registered")

    @mount(router, REVOKE_CONSENT)
    def post_revocation(body: ConsentRevocation, caller: Caller) -> Registered:
        """Register a consumer's signed revocation; it applies from the next query."""
        consent_registry(ctx).revoke(body, _now())
        append_entry(ctx, "consent_revoked", body.log_payload())
        return Registered(id=body.consent_id, status="revoked")

    @mount(router, REGISTER_CONTRACT)
    def post_contract(body: SignedContract, caller: Caller) -> Registered:
        """Register a contract with the signatures it carries; in force once all parties sign.

        Only the product owner registers, and a contract that leaves out a party its
        scenario requires (each hospital among them), gives a data owner no revenue share,
        or names a data user that is not a data user's node, is refused.
        """
        _check_signatories(ctx, body)
        book = contract_book(ctx)
        before = book.get(body.contract_id).missing_signatures() if _known(
            book, body.contract_id) else body.terms.parties
        stored = book.register(body, _now())
        missing = stored.missing_signatures()
        if before and not missing:
            append_entry(ctx, "contract_signed", stored.log_payload())
        status = "in force" if not missing else f"awaiting {', '.join(missing)}"
        return Registered(id=stored.contract_id, status=status)

    @mount(router, CONTRACT)
    def get_contract(contract_id: str, caller: Caller) -> SignedContract:
        """A contract, to its parties only; to anyone else it does not exist."""
        contract = contract_book(ctx).get(contract_id)
        if caller.name != ctx.name and caller.name not in contract.terms.parties:
            raise contract_lib.ContractUnknown(f"no contract {contract_id}")
        return contract

    @mount(router, TERMINATE_CONTRACT)
    def post_termination(
        contract_id: str, body: ContractTermination, caller: Caller
    ) -> Registered:
        """End a contract at once; the product refuses its queries from now on."""
        if body.contract_id != contract_id:
            raise IdentityMismatch("the termination names another contract")
        if caller.name not in (body.party, ctx.name):
            raise IdentityMismatch(f"{caller.name} cannot file {body.party}'s termination")
        book = contract_book(ctx)
        if body.party not in book.get(contract_id).terms.parties:  # as if it did not exist
            raise contract_lib.ContractUnknown(f"no contract {contract_id}")
        effective = book.terminate(body, _now())
        append_entry(ctx, "contract_terminated", {
            "contract_id": contract_id, "party": body.party, "reason": body.reason,
            "effective_at_ms": int(effective.timestamp() * 1000),
            "notice_sha256": hashlib.sha256(body.model_dump_json().encode()).hexdigest(),
        })
        return Registered(id=contract_id, status="terminated")

    return [router]


def _check_signatories(ctx: NodeContext, contract: SignedContract) -> None:
    terms = contract.terms
    missing = sorted(required_signatories(ctx.topology, terms.scenario) - set(terms.parties))
    if missing:
        raise ContractSignatoriesMissing(
            f"contract {terms.contract_id} must name {', '.join(missing)} as parties")
    unpaid = sorted(p for p in terms.parties if ctx.topology.has_node(p)
                    and ctx.topology.node(p).role == DATA_OWNER_ROLE
                    and terms.revenue_split_bp.get(p, 0) == 0)
    if unpaid:
        raise DataOwnerShareMissing(
            f"contract {terms.contract_id} gives data owners {', '.join(unpaid)} no revenue "
            "share")
    user_role = DATA_USER_ROLES[terms.scenario]
    strangers = sorted(u for u in terms.data_users
                       if not ctx.topology.has_node(u) or ctx.topology.node(u).role != user_role)
    if strangers:
        raise ContractSignatoriesMissing(
            f"data users must be {user_role.value} nodes: {', '.join(strangers)}")


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
