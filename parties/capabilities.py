"""Which capability services each role's node hosts.

Services are listed by module path and imported only by the nodes that host
them, so a hospital node does not load the MPC engines.
"""

import importlib

from parties.runtime.service import Service
from parties.runtime.topology import Role

# "module:attribute" of every service, in mounting order.
SERVICE_PATHS: tuple[str, ...] = (
    "parties.admin.service:SERVICE",
    "parties.agreements.service:SERVICE",
    "parties.ledger.service:OPERATOR_SERVICE",
    "parties.ledger.witness:WITNESS_SERVICE",
    "parties.ingest.hospital:HOSPITAL_EXPORT_SERVICE",
    "parties.ingest.authority:HEALTH_AUTHORITY_SERVICE",
    "parties.domains.service:AUTHORITY_LEVEL1_OPRF_SERVICE",
    "parties.ingest.circulation:OPERATOR_CIRCULATION_SERVICE",
    "parties.domains.service:OPERATOR_DOMAINS_SERVICE",
    "parties.domains.rotation:OPERATOR_KEY_ROTATION_SERVICE",
    "parties.domains.level1_rotation:AUTHORITY_LEVEL1_ROTATION_SERVICE",
    "parties.domains.level1_rotation:OPERATOR_LEVEL1_ROTATION_SERVICE",
    "parties.domains.relay:REGULATOR_OPRF_SERVICE",
    "parties.claims.service:REGULATOR_PRODUCT_SERVICE",
    "parties.claims.compute:OPERATOR_COMPUTE_SERVICE",
    "parties.claims.sessions:REGULATOR_FOLLOWER_SERVICE",
    "parties.claims.sessions:DEALER_SERVICE",
    "parties.secure_room.service:OPERATOR_SECURE_ROOM_SERVICE",
    "parties.secure_room.approval:PACKAGE_APPROVAL_SERVICE",
    "parties.stats.regulator:REGULATOR_STATS_SERVICE",
    "parties.stats.operator:OPERATOR_STATS_SERVICE",
)


def _load(path: str) -> Service:
    module, attr = path.split(":")
    service = getattr(importlib.import_module(module), attr)
    assert isinstance(service, Service), path
    return service


def services_for(role: Role) -> list[Service]:
    """The services hosted by nodes of `role`."""
    return [s for s in map(_load, SERVICE_PATHS) if role in s.roles]
