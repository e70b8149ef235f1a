"""A data user's way to its shared domain's tokens: the blinded OPRF chain, seen from the
insurer.

The insurer blinds each id (B = r·H(id), r fresh per id), the regulator relays the points
(`parties.domains.relay`), the operator applies k2[d] and the health authority k1, each
with a batched DLEQ proof; the insurer checks both proofs against the key commitments in
the log (`parties.domains.commitment_book`) and only then unblinds:
r^-1·k1·k2·r·H(id) = T_d(id). An answer that fails is refused (`OprfProofInvalid`, in the
insurer's node log): no token of it is returned, used or stored. Each batch of blinded points is
signed with the insurer's node key, bound to the request id (`parties.domains.batch`),
and the key holders evaluate nothing else. No key holder sees an id, and the insurer
cannot compute a token alone. This module loads no web framework: the
insurer's SDK imports it.
"""

from collections.abc import Sequence

from mpc import xid
from parties.domains.api import DEFAULT_SCENARIO, DOMAIN_TOKENS, MAX_POINTS, OprfProofInvalid
from parties.domains.batch import sign_batch
from parties.domains.commitment_book import CommitmentBook, verify_answer
from parties.runtime.client import NodeClient
from parties.runtime.node_log import NodeLog, current_request_id, new_request_id
from parties.runtime.pki import load_signing_key
from parties.runtime.topology import Role


def domain_tokens(
    client: NodeClient, ids: Sequence[str | bytes], *, scenario: str = DEFAULT_SCENARIO,
    book: CommitmentBook | None = None,
) -> list[bytes]:
    """T_d(id) for each id, d being the caller's shared domain in `scenario`.

    `client` holds an insurer's certificate and runs where its signing key is; `book` is
    the log's key commitments as read so far (a fresh one reads the whole log). Raises the
    key holders' typed refusal (`OprfBudgetSpent` 429, `DomainDeleted` 410,
    `UnknownDomain` 404, ...), which is also a `parties.runtime.errors.RemoteError`, or
    `OprfProofInvalid` for an answer whose proofs fail.
    """
    book = book or CommitmentBook(client)
    regulator = client.topology.node_of(Role.REGULATOR)
    key = load_signing_key(client.state, client.me)
    # The signed request id is the one the calls carry, so it follows the batch in every log.
    scope = current_request_id.set(current_request_id.get() or new_request_id())
    try:
        tokens: list[bytes] = []
        for start in range(0, len(ids), MAX_POINTS):
            blinded, state = xid.blind(list(ids[start:start + MAX_POINTS]))
            batch = sign_batch(key, client.me, blinded, str(current_request_id.get()),
                               scenario=scenario)
            answer = client.call(regulator, DOMAIN_TOKENS, batch)
            try:
                evaluated = verify_answer(book, blinded, answer, scenario=scenario)
            except OprfProofInvalid as exc:
                log = client.log or NodeLog(client.state.node(client.me).log, client.me)
                log.event("oprf_proof_refused", batch_id=batch.batch_id, points=len(blinded),
                          error=str(exc))
                raise
            tokens += xid.unblind(state, evaluated)
        return tokens
    finally:
        current_request_id.reset(scope)
