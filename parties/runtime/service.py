"""A service: what one capability runs on the nodes of some roles.

A service is a set of routes (and optional background work) hosted by the
nodes of some roles, plus the store components it needs. The runtime hosts
services; a service never sees sockets, certificates or processes.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import APIRouter

from parties.runtime.context import NodeContext
from parties.runtime.store import Component
from parties.runtime.topology import Role


@dataclass(frozen=True)
class Service:
    name: str
    roles: tuple[Role, ...]
    routers: Callable[[NodeContext], list[APIRouter]]
    components: tuple[Component, ...] = field(default_factory=tuple)
    # Started once the node serves (e.g. a witness polling the log); runs in a thread.
    background: Callable[[NodeContext], None] | None = None
