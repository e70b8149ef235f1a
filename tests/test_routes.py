"""Routes as data: paths filled safely, handlers bound to their declared models."""

import pytest
from fastapi import APIRouter
from pydantic import BaseModel

from parties.runtime.access import Caller, CallerPolicy, route_policies
from parties.runtime.mount import mount
from parties.runtime.routes import Kind, Route
from parties.runtime.topology import Role


class Question(BaseModel):
    text: str


class Answer(BaseModel):
    text: str


ASK = Route("POST", "/test/{topic}/ask", Kind.CLAIM, Question, Answer,
            roles=(Role.INSURER,))


def test_a_path_is_filled_with_exactly_its_parameters_quoted():
    assert ASK.url(topic="a b?c#d") == "/test/a%20b%3Fc%23d/ask"
    for bad in ({}, {"topic": "x", "extra": "y"}, {"topic": "../admin"}, {"topic": ".."},
                {"topic": ""}):
        with pytest.raises(ValueError):
            ASK.url(**bad)


def test_mount_gives_the_handler_its_routes_policy_and_models():
    router = APIRouter()

    @mount(router, ASK)
    def ask(topic: str, body: Question, caller: Caller) -> Answer:
        return Answer(text=body.text)

    [(method, path, policy)] = route_policies(router.routes)
    assert (method, path) == ("POST", ASK.path)
    assert isinstance(policy, CallerPolicy)
    assert (policy.kind, policy.roles) == (Kind.CLAIM, (Role.INSURER,))
    assert router.routes[0].response_model is Answer


def test_mount_refuses_a_body_of_another_model():
    with pytest.raises(TypeError):
        @mount(APIRouter(), ASK)
        def wrong(body: Answer, caller: Caller) -> Answer:
            return body


def test_a_handler_without_a_caller_is_still_guarded():
    router = APIRouter()

    @mount(router, ASK)
    def ask(topic: str, body: Question) -> Answer:
        return Answer(text=body.text)

    assert [p.kind for _, _, p in route_policies(router.routes)] == [Kind.CLAIM]
