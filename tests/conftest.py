import pytest

from tests.federation import Federation


@pytest.fixture(scope="module")
def small_federation(tmp_path_factory):
    """hospital-1, health-authority, operator, insurer-a as real processes."""
    fed = Federation(
        tmp_path_factory.mktemp("fed"),
        nodes=["hospital-1", "health-authority", "operator", "insurer-a"],
    )
    fed.up()
    yield fed
    fed.down()
