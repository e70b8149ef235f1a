"""Second factor for the operator's admin commands (the paper asks for it).

The operator's local administrator enrolls a TOTP secret (RFC 6238) once, then
opens an admin session with a current code: the node returns a session token
(HMAC under the node's KEK, valid for `SESSION_SECONDS`), which the CLI keeps
in `<state>/<node>/admin.session` (mode 0600) and sends with every admin call.
Without a live session, every admin route of the operator refuses with
`SecondFactorRequired`. Codes are single-use and wrong codes lock the account
(`governance.second_factor`).
"""

import hashlib
import hmac
import os
import time

from governance.second_factor import COMPONENT, MIGRATIONS, SecondFactor
from parties.runtime.context import NodeContext
from parties.runtime.errors import NodeError
from parties.runtime.store import connect
from parties.runtime.topology import Role

SESSION_SECONDS = 15 * 60
ACCOUNT = "admin"
ROLES_REQUIRING_SECOND_FACTOR = (Role.OPERATOR,)

COMPONENTS = ((COMPONENT, MIGRATIONS),)


class SecondFactorRequired(NodeError):
    """The operator's admin routes need a session opened with a TOTP code."""

    http_status = 401


def second_factor(ctx: NodeContext) -> SecondFactor:
    key = hashlib.sha256(b"cogov-second-factor|" + ctx.secrets.kek).digest()
    return ctx.component(
        SecondFactor,
        lambda: SecondFactor(connect(ctx.paths.db, explicit_transactions=True), key),
    )


def _session_mac(kek: bytes, expires: int, nonce: str) -> str:
    return hmac.new(kek, f"admin-session|{expires}|{nonce}".encode(), "sha256").hexdigest()


def issue_session(ctx: NodeContext, now: float | None = None) -> str:
    expires = int((now or time.time()) + SESSION_SECONDS)
    nonce = os.urandom(12).hex()
    return f"{expires}.{nonce}.{_session_mac(ctx.secrets.kek, expires, nonce)}"


def check_session(ctx: NodeContext, token: str | None, now: float | None = None) -> None:
    if not token:
        raise SecondFactorRequired(
            "operator admin commands need a second factor: run `cogov admin login`"
        )
    try:
        expires_text, nonce, mac = token.split(".")
        expires = int(expires_text)
    except ValueError as exc:
        raise SecondFactorRequired("malformed admin session token") from exc
    if not hmac.compare_digest(mac, _session_mac(ctx.secrets.kek, expires, nonce)):
        raise SecondFactorRequired("admin session token is not valid on this node")
    if expires < (now or time.time()):
        raise SecondFactorRequired("admin session expired: run `cogov admin login` again")
