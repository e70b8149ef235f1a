"""Request ids checked at the edge, and the id a request is known by in the log.

A client chooses its `X-Request-ID` (for idempotent retries), so the id is client input:
it is checked before any handler runs (`REQUEST_ID_PATTERN`; `InvalidRequestId`, 400),
and it is never what the node stores, logs or forwards. Each request is known by its
*log id* instead, `rq-` and 40 hex digits:

- an id that already is a log id is kept (a node relaying a request, or a client that
  derived it itself);
- any other id is replaced by `log_request_id(pair_key, client_id)`, an HMAC-SHA256 of
  the client's id keyed by a secret that only the caller and this node can compute
  (`pair_key`: HKDF over the X25519 agreement of their certified signing keys).

So a national id sent as a request id never reaches the log, and nobody but the caller
and the serving node can test a guess of it against the log (a plain hash of a national
id would fall to enumeration). The caller computes its log id itself (it binds its
sealed envelope and its request signature to it); no id travels in the clear that the
client did not already know. A request without an id gets a fresh random log id.
"""

import hashlib
import hmac
import re
import secrets

import nacl.bindings
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from parties.runtime.errors import NodeError
from parties.runtime.sealing import sealing_private_key, sealing_public_key

MAX_REQUEST_ID_CHARS = 128
REQUEST_ID_PATTERN = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_REQUEST_ID_CHARS}}}")
LOG_ID_PREFIX = "rq-"
LOG_ID_PATTERN = re.compile(r"rq-[0-9a-f]{40}")
PAIR_KEY_INFO = b"cogov-request-id-v1"


class InvalidRequestId(NodeError):
    """The `X-Request-ID` is empty, longer than 128 characters, or has characters outside
    `[A-Za-z0-9._-]`; refused before any handler runs (the id itself is not echoed)."""

    http_status = 400


def new_log_id() -> str:
    """A fresh random log id, for a request that came without one."""
    return LOG_ID_PREFIX + secrets.token_hex(20)


def pair_key(own_signing_key: Ed25519PrivateKey, peer_signing_public: bytes) -> bytes:
    """The secret this node and `peer` share for request ids (either side computes it):
    HKDF-SHA256 of the X25519 agreement of their certified Ed25519 signing keys."""
    own = bytes(sealing_private_key(own_signing_key))
    peer = bytes(sealing_public_key(peer_signing_public))
    shared = nacl.bindings.crypto_scalarmult(own, peer)
    return HKDF(hashes.SHA256(), 32, salt=None, info=PAIR_KEY_INFO).derive(shared)


def log_request_id(key: bytes, client_id: str) -> str:
    """The log id of a request the client calls `client_id` (kept if it already is one)."""
    check_request_id(client_id)
    if LOG_ID_PATTERN.fullmatch(client_id):
        return client_id
    mac = hmac.new(key, client_id.encode("ascii"), hashlib.sha256).hexdigest()
    return LOG_ID_PREFIX + mac[:40]


def check_request_id(client_id: str) -> None:
    """Refuse an id outside `REQUEST_ID_PATTERN` with `InvalidRequestId`."""
    if not REQUEST_ID_PATTERN.fullmatch(client_id):
        raise InvalidRequestId(
            f"X-Request-ID must be 1 to {MAX_REQUEST_ID_CHARS} characters of "
            "[A-Za-z0-9._-]; the request was not processed")
