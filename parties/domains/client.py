"""A data user's way to its shared domain's tokens: the blinded OPRF chain, seen from the
insurer.

The insurer blinds each id (r·H(id), r fresh per id), the regulator relays the points
(`parties.domains.relay`), the operator and the health authority apply their keys, and
the insurer unblinds: r^-1·k2·k1·r·H(id) = T_d(id). Each batch of blinded points is
signed with the insurer's node key, bound to the request id (`parties.domains.batch`),
and the key holders evaluate nothing else. No key holder sees an id, and the insurer
cannot compute a token alone. This module loads no web framework: the
insurer's SDK imports it.
"""

from collections.abc import Sequence

from mpc import xid
from parties.domains.api import DEFAULT_SCENARIO, DOMAIN_TOKENS, MAX_POINTS
from parties.domains.batch import sign_batch
from parties.runtime.client import NodeClient
from parties.runtime.node_log import current_request_id, new_request_id
from parties.runtime.pki import load_signing_key
from parties.runtime.topology import Role


def domain_tokens(
    client: NodeClient, ids: Sequence[str | bytes], *, scenario: str = DEFAULT_SCENARIO,
) -> list[bytes]:
    """T_d(id) for each id, d being the caller's shared domain in `scenario`.

    `client` holds an insurer's certificate and runs where its signing key is. Raises the
    key holders' typed refusal (`OprfBudgetSpent` 429, `DomainDeleted` 410,
    `UnknownDomain` 404, ...), which is also a `parties.runtime.errors.RemoteError`.
    """
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
            tokens += xid.unblind(state, [bytes.fromhex(p) for p in answer.points])
        return tokens
    finally:
        current_request_id.reset(scope)
