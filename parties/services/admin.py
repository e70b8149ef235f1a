"""Second-factor enrolment and admin sessions (see `parties.runtime.admin_session`)."""

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from parties.runtime.access import Caller, CallerPolicy
from parties.runtime.admin_session import (
    ACCOUNT,
    COMPONENTS,
    ROLES_REQUIRING_SECOND_FACTOR,
    SESSION_SECONDS,
    issue_session,
    second_factor,
)
from parties.runtime.context import NodeContext
from parties.runtime.errors import NodeError
from parties.runtime.service import Service


class AlreadyEnrolled(NodeError):
    """Re-enrolment needs an admin session opened with the current factor."""

    http_status = 409


class Enrollment(BaseModel):
    secret: str
    provisioning_uri: str


class SessionRequest(BaseModel):
    code: str = Field(pattern=r"^[0-9]{6}$")


class AdminSession(BaseModel):
    token: str
    expires_in_s: int


def _routes(ctx: NodeContext) -> list[APIRouter]:
    router = APIRouter(prefix="/v1/admin", tags=["admin"])

    @router.post("/second-factor", response_model=Enrollment)
    def enroll(
        caller: Caller = Depends(CallerPolicy("admin", second_factor=False)),
    ) -> Enrollment:
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

    @router.post("/session", response_model=AdminSession)
    def open_session(
        body: SessionRequest,
        caller: Caller = Depends(CallerPolicy("admin", second_factor=False)),
    ) -> AdminSession:
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
