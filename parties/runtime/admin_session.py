"""Second factor for the operator's admin commands (the paper asks for it).

The operator's local administrator enrolls a TOTP secret (RFC 6238) once, then
opens an admin session with a current code: the node returns a session token
(HMAC-SHA256, valid for `SESSION_SECONDS`), which the CLI keeps in
`<state>/<node>/admin.session` (mode 0600) and sends with every admin call.
Without a live session, every admin route of the operator refuses with
`SecondFactorRequired`. Codes are single-use and wrong codes back off exponentially,
across restarts (`governance.second_factor`).

Neither key comes from the KEK: the TOTP secrets are wrapped under the admin subkey
`TOTP_WRAP_LABEL` and sessions are MACed under `SESSION_MAC_LABEL`, both HKDF subkeys of
the separate admin key (`parties.runtime.secrets`). Secrets enrolled when the wrapping key
was derived from the KEK are re-wrapped when the component opens.
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
TOTP_WRAP_LABEL = "cogov admin: totp secret wrapping v1"
SESSION_MAC_LABEL = "cogov admin: session mac v1"
ROLES_REQUIRING_SECOND_FACTOR = (Role.OPERATOR,)

COMPONENTS = ((COMPONENT, MIGRATIONS),)


class SecondFactorRequired(NodeError):
    """The operator's admin routes need a session opened with a TOTP code."""

    http_status = 401


def second_factor(ctx: NodeContext) -> SecondFactor:
    return ctx.component(SecondFactor, lambda: _open_second_factor(ctx))


def _open_second_factor(ctx: NodeContext) -> SecondFactor:
    factor = SecondFactor(connect(ctx.paths.db, explicit_transactions=True),
                          ctx.secrets.admin_subkey(TOTP_WRAP_LABEL))
    # Before the admin key, the wrapping key was derived from the KEK.
    legacy = hashlib.sha256(b"cogov-second-factor|" + ctx.secrets.kek).digest()
    if factor.rewrap_from(legacy):
        ctx.log.event("second_factor_rewrapped")
    return factor


def _session_mac(ctx: NodeContext, expires: int, nonce: str) -> str:
    return hmac.new(ctx.secrets.admin_subkey(SESSION_MAC_LABEL),
                    f"admin-session|{expires}|{nonce}".encode(), "sha256").hexdigest()


def issue_session(ctx: NodeContext, now: float | None = None) -> str:
    expires = int((now or time.time()) + SESSION_SECONDS)
    nonce = os.urandom(12).hex()
    return f"{expires}.{nonce}.{_session_mac(ctx, expires, nonce)}"


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
    if not hmac.compare_digest(mac, _session_mac(ctx, expires, nonce)):
        raise SecondFactorRequired("admin session token is not valid on this node")
    if expires < (now or time.time()):
        raise SecondFactorRequired("admin session expired: run `cogov admin login` again")
