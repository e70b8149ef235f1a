"""One name-to-class registry of typed errors, and what a relayed refusal becomes."""

import importlib
import pkgutil

import pytest

from governance.consent import ConsentMismatch
from parties.runtime.errors import (
    TYPED_ERROR_BASES,
    RemoteError,
    remote_error,
    typed_error_class,
)


def _every_typed_error() -> list[type[Exception]]:
    for top in ("mpc", "governance", "federated", "parties"):
        package = importlib.import_module(top)
        for module in pkgutil.walk_packages(package.__path__, f"{top}."):
            if not module.name.endswith("_harness"):  # the sandbox's standalone script
                importlib.import_module(module.name)
    found, pending = [], list(TYPED_ERROR_BASES)
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if not issubclass(cls, RemoteError) or cls is RemoteError:
            found.append(cls)
    return found


def test_typed_error_names_are_unique_across_the_project():
    """A refusal travels by name: two classes with one name would be confused."""
    by_name: dict[str, list[str]] = {}
    for cls in _every_typed_error():
        by_name.setdefault(cls.__name__, []).append(f"{cls.__module__}.{cls.__qualname__}")
    assert {name: where for name, where in by_name.items() if len(set(where)) > 1} == {}


def test_a_remote_refusal_is_both_remote_and_of_its_own_class():
    exc = remote_error(403, "ConsentMismatch", "not this person")
    assert isinstance(exc, ConsentMismatch) and isinstance(exc, RemoteError)
    assert (exc.http_status, exc.error, exc.detail) == (403, "ConsentMismatch", "not this person")
    assert type(exc).__name__ == "ConsentMismatch"
    with pytest.raises(ConsentMismatch):
        raise exc


def test_an_unknown_remote_name_stays_a_plain_remote_error():
    exc = remote_error(418, "NoSuchErrorAnywhere", "teapot")
    assert type(exc) is RemoteError and exc.error == "NoSuchErrorAnywhere"


def test_the_registry_never_answers_with_a_generated_remote_class():
    remote_error(403, "ConsentMismatch", "x")  # creates the generated subclass
    assert typed_error_class("ConsentMismatch") is ConsentMismatch
    assert typed_error_class("RemoteError") is None
