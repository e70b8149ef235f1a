"""Mount a declared `Route` on a FastAPI router: the server side of `parties.runtime.routes`.

    @mount(router, api.CHECK)
    def check(body: ClaimBatch, caller: Caller) -> ClaimAnswer: ...

The route's caller policy becomes the dependency of a parameter annotated `Caller`
(or a route-level dependency when the handler takes none), and the route's models
become the handler's response model, so the path, kind, roles and schema are the
ones the clients call with.
"""

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends

from parties.runtime.access import Caller, CallerPolicy
from parties.runtime.routes import Raw, Route

F = TypeVar("F", bound=Callable[..., Any])


def caller_policy(route: Route) -> CallerPolicy:
    return CallerPolicy(route.kind, route.roles, second_factor=route.second_factor)


def mount(router: APIRouter, route: Route, **options: Any) -> Callable[[F], F]:
    """Register the decorated handler as `route` on `router`."""

    def register(handler: F) -> F:
        policy = caller_policy(route)
        signature = inspect.signature(handler)
        params = []
        takes_caller = False
        for param in signature.parameters.values():
            if param.annotation in (Caller, "Caller"):
                param = param.replace(default=Depends(policy))
                takes_caller = True
            elif (
                route.request not in (None, Raw)
                and param.name == "body"
                and param.annotation not in (route.request, route.request.__name__)
            ):
                raise TypeError(f"{handler.__name__}: body must be {route.request.__name__}")
            params.append(param)
        handler.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        typed = route.response not in (None, Raw)
        router.add_api_route(
            route.path,
            handler,
            methods=[route.method],
            # Raw and empty answers are returned as a `Response` by the handler itself.
            response_model=route.response if typed else None,
            dependencies=[] if takes_caller else [Depends(policy)],
            tags=[route.tag] if route.tag else None,
            **options,
        )
        return handler

    return register

