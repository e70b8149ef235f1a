"""Role behaviours: what each kind of party does, separate from the runtime.

A behaviour is a function `(ctx: NodeContext) -> list[APIRouter]`, plus the
store components it needs. The runtime hosts it; the behaviour never sees
sockets, certificates or processes.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import APIRouter

from parties.context import NodeContext
from parties.store import Component
from parties.topology import Role


@dataclass(frozen=True)
class Behaviour:
    role: Role
    routers: Callable[[NodeContext], list[APIRouter]]
    components: tuple[Component, ...] = field(default_factory=tuple)


def _no_routes(ctx: NodeContext) -> list[APIRouter]:
    return []


def behaviour_for(role: Role) -> Behaviour:
    """The behaviour hosted by nodes of `role`."""
    return BEHAVIOURS.get(role, Behaviour(role, _no_routes))


BEHAVIOURS: dict[Role, Behaviour] = {}
