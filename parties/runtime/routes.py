"""Routes as data: each capability's `api.py` declares its routes once with these types.

A `Route` names the method, the path, the request kind the topology must allow,
the roles that may call it, and the request and response models. The server
mounts it (`parties.runtime.mount`) and the typed client calls it
(`NodeClient.call`), so no module writes a raw path or reads an untyped dict.
This module imports no web framework: an insurer's SDK loads it without a server.
"""

import re
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

from pydantic import BaseModel

from parties.runtime.topology import Kind, Role

Method = Literal["GET", "POST", "PUT", "DELETE"]


class Raw:
    """A response (or request) body that is bytes, not JSON: Arrow batches, sealed blobs."""


Req = TypeVar("Req")
Resp = TypeVar("Resp")

_PARAM = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


@dataclass(frozen=True)
class Route(Generic[Req, Resp]):
    """One endpoint of a node: declared once, mounted by the server, called by clients.

    `request` is the JSON body's model (None: no body; `Raw`: bytes). `response` is
    the model, a `list[Model]`, `Raw` for bytes, or None for an empty answer.
    `roles` None admits every role the topology allows; `second_factor` applies to
    `Kind.ADMIN` routes of the roles that require one.
    """

    method: Method
    path: str
    kind: Kind
    request: type[Req] | None
    response: Any
    roles: tuple[Role, ...] | None = None
    second_factor: bool = True
    tag: str = ""

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(_PARAM.findall(self.path))

    def url(self, **params: str | int) -> str:
        """The path with its `{name}` parameters filled in; refuses a missing or extra one."""
        if set(params) != set(self.parameters):
            raise ValueError(
                f"{self.path} takes parameters {self.parameters}, got {sorted(params)}"
            )
        for name, value in params.items():
            if "/" in str(value) or str(value) in ("", ".", ".."):
                raise ValueError(f"path parameter {name} must be one non-empty path segment")
        # Quoted, so a value can never add a query string or a fragment to the path.
        return _PARAM.sub(lambda m: quote(str(params[m.group(1)]), safe=""), self.path)


def json_body(model: BaseModel | None) -> Any:
    """A request model as the JSON value sent on the wire."""
    return None if model is None else model.model_dump(mode="json")
