"""The insurer's side of the claimants' self-pay statistic: one signed request.

The insurer sends no ids: the statistic runs over the claimants it submitted to consented
claim checks, kept by the operator (`parties.claims.checked_claimants`).
"""

from governance.meters import sign_request
from parties.claims.api import REQUEST_SIGNATURE_HEADER
from parties.runtime.client import NodeClient
from parties.runtime.node_log import current_request_id
from parties.runtime.pki import load_signing_key
from parties.runtime.request_ids import new_log_id
from parties.stats.api import (
    DEFAULT_MAX_VALUE,
    SELF_PAY,
    SelfPayQuery,
    SelfPayRequest,
    StatsAnswer,
    regulator_node,
    signed_self_pay,
)


def self_pay_request(client: NodeClient, body: SelfPayRequest) -> tuple[str, str]:
    """(log id, the insurer's signature) for sending `body` as `client`'s node."""
    log_id = new_log_id()  # a log id is kept as is by the regulator (`request_ids`)
    key = load_signing_key(client.state, client.me)
    return log_id, sign_request(key, signed_self_pay(log_id, client.me, body))


def claimant_self_pay(client: NodeClient, contract_id: str, query: SelfPayQuery, *,
                      epsilon: float, max_value: int = DEFAULT_MAX_VALUE) -> StatsAnswer:
    """Ask the regulator for the statistic as the insurer holding `client`'s certificate.

    Raises `RemoteError` for the nodes' refusals (`StatisticNotReleased` when the group is
    too small, the ε budget is spent or no consent is in force: one refusal for all)."""
    body = SelfPayRequest(contract_id=contract_id, query=query, epsilon=epsilon,
                          max_value=max_value)
    log_id, signature = self_pay_request(client, body)
    token = current_request_id.set(log_id)
    try:
        return client.call(regulator_node(client.topology), SELF_PAY, body,
                           headers={REQUEST_SIGNATURE_HEADER: signature})
    finally:
        current_request_id.reset(token)
