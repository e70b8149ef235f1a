"""Operator admin routes need a TOTP-opened session (RFC 6238 second factor)."""

import time

import pytest

from governance.second_factor import totp_code
from parties.admin.api import ENROLL, OPEN_SESSION
from parties.admin.cli import secret_file
from parties.runtime.api import REFUSALS
from parties.runtime.client import NodeClient
from parties.runtime.errors import RemoteError
from parties.runtime.session_file import SESSION_HEADER, session_file
from tests.federation import Federation


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("2fa"), nodes=["operator", "health-authority"])
    fed.up()  # enrolls and logs in the operator's administrator
    yield fed
    fed.down()


def test_operator_admin_route_needs_a_session(fed):
    paths = fed.state.node("operator")
    with NodeClient(fed.state, fed.topology, "operator") as client:
        assert client.send("operator", REFUSALS).status_code == 200
    backup = paths.root / "session.bak"
    session_file(paths).rename(backup)
    try:
        with NodeClient(fed.state, fed.topology, "operator") as client, \
                pytest.raises(RemoteError) as refused:
            client.send("operator", REFUSALS)
    finally:
        backup.rename(session_file(paths))
    assert refused.value.http_status == 401
    assert refused.value.error == "SecondFactorRequired"


def test_other_nodes_admin_routes_need_no_second_factor(fed):
    with NodeClient(fed.state, fed.topology, "health-authority") as client:
        assert client.send("health-authority", REFUSALS).status_code == 200


def test_second_enrollment_needs_a_session_and_is_refused(fed):
    with NodeClient(fed.state, fed.topology, "operator") as client, \
            pytest.raises(RemoteError) as refused:
        client.send("operator", ENROLL)
    assert refused.value.error == "AlreadyEnrolled"


def test_wrong_and_replayed_codes_are_refused(fed):
    secret = secret_file(fed.state, "operator").read_text().strip()
    with NodeClient(fed.state, fed.topology, "operator") as client:
        current = totp_code(secret, time.time())
        wrong_code = "000000" if current != "000000" else "111111"
        with pytest.raises(RemoteError) as wrong:
            client.send("operator", OPEN_SESSION, json={"code": wrong_code})
        assert wrong.value.error == "SecondFactorInvalid"
        # The code that opened the fixture's session is spent for this time step.
        used = totp_code(secret, time.time())
        with pytest.raises(RemoteError) as replayed:
            client.send("operator", OPEN_SESSION, json={"code": used})
        assert replayed.value.error in ("SecondFactorReplayed", "SecondFactorInvalid")


def test_forged_session_token_is_refused(fed):
    forged = f"{int(time.time()) + 600}.00.{'ab' * 32}"
    with NodeClient(fed.state, fed.topology, "operator") as client, \
            pytest.raises(RemoteError) as refused:
        client.send("operator", REFUSALS, headers={SESSION_HEADER: forged})
    assert refused.value.error == "SecondFactorRequired"
