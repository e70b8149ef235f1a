"""Second-factor enrolment and admin sessions (the check itself is
`parties.runtime.admin_session`)."""

from fastapi import APIRouter

from parties.admin.api import (
    ENROLL,
    OPEN_SESSION,
    AdminSession,
    AlreadyEnrolled,
    Enrollment,
    SessionRequest,
)
from parties.runtime.access import Caller
from parties.runtime.admin_session import (
    ACCOUNT,
    COMPONENTS,
    ROLES_REQUIRING_SECOND_FACTOR,
    SESSION_SECONDS,
    issue_session,
    second_factor,
)
from parties.runtime.context import NodeContext
from parties.runtime.mount import mount
from parties.runtime.service import Service


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter()

    @mount(router, ENROLL)
    def enroll(caller: Caller) -> Enrollment:
        """Enroll the administrator's TOTP secret (once; shown only here)."""
        from governance.second_factor import provisioning_uri

        factor = second_factor(ctx)
        exists = ctx.store.conn.execute(
            "SELECT 1 FROM second_factor_accounts WHERE account = ?", (ACCOUNT,)
        ).fetchone()
        if exists:
            raise AlreadyEnrolled("a second factor is already enrolled for this node")
        secret = factor.enroll(ACCOUNT)
        ctx.log.event("second_factor_enrolled")
        return Enrollment(
            secret=secret, provisioning_uri=provisioning_uri(secret, f"{ctx.name}-admin")
        )

    @mount(router, OPEN_SESSION)
    def open_session(body: SessionRequest, caller: Caller) -> AdminSession:
        """Open an admin session with a current TOTP code."""
        second_factor(ctx).verify(ACCOUNT, body.code)
        ctx.log.event("admin_session_opened")
        return AdminSession(token=issue_session(ctx), expires_in_s=SESSION_SECONDS)

    return [router]


SERVICE = Service(
    name="admin",
    roles=ROLES_REQUIRING_SECOND_FACTOR,
    routers=_routes,
    components=COMPONENTS,
)
