"""The admin capability's contract: second-factor enrolment and admin sessions.

Both routes are `Kind.ADMIN` (only the node's own administrator, holding its key)
and are the two admin routes that need no open session: they are how one opens.
"""

from pydantic import BaseModel, Field

from parties.runtime.errors import NodeError
from parties.runtime.routes import Kind, Route


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


ENROLL = Route("POST", "/v1/admin/second-factor", Kind.ADMIN, None, Enrollment,
               second_factor=False, tag="admin")
OPEN_SESSION = Route("POST", "/v1/admin/session", Kind.ADMIN, SessionRequest, AdminSession,
                     second_factor=False, tag="admin")
