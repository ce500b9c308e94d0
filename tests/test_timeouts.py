"""Timeouts and ServerTimeouts: immutable, validated values with the documented defaults."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from triocomm import ServerTimeouts, Timeouts

CLIENT_DEFAULTS = {
    "connect": 10,
    "send": None,
    "first_response": None,
    "receive": None,
    "inactivity": 10,
    "keepalive": 60,
    "pool": 30,
}
SERVER_DEFAULTS = {
    "first_request": 10,
    "receive": None,
    "inactivity": 10,
    "send": None,
    "keepalive": 60,
    "handshake": 10,
}
# A service's minimum data rates (bytes per second) and their grace (seconds):
# not time limits, so they have rules of their own (tested below).
SERVER_RATES = {"min_receive_rate": 240, "min_send_rate": 240, "rate_grace": 5}
BOTH = [(Timeouts, CLIENT_DEFAULTS), (ServerTimeouts, SERVER_DEFAULTS)]
IDS = ["Timeouts", "ServerTimeouts"]


@pytest.mark.parametrize(
    ("cls", "defaults"),
    [(Timeouts, CLIENT_DEFAULTS), (ServerTimeouts, {**SERVER_DEFAULTS, **SERVER_RATES})],
    ids=IDS,
)
def test_defaults_match_the_design(cls: Any, defaults: dict[str, Any]) -> None:
    value = cls()
    assert {f.name: getattr(value, f.name) for f in dataclasses.fields(value)} == defaults


@pytest.mark.parametrize("name", ["min_receive_rate", "min_send_rate"])
def test_a_rate_is_bytes_per_second_or_none(name: str) -> None:
    for good in (None, 0.5, 1, 240, 10**9):
        assert getattr(ServerTimeouts(**{name: good}), name) == good
    for bad, error in [(0, ValueError), (-1, ValueError), (math.inf, ValueError),
                       (math.nan, ValueError), ("240", TypeError), (True, TypeError)]:  # fmt: skip
        with pytest.raises(error, match=name):
            ServerTimeouts(**{name: bad})


def test_the_rates_grace_is_seconds_never_none() -> None:
    for good in (0, 0.5, 5, math.inf):
        assert ServerTimeouts(rate_grace=good).rate_grace == good
    for bad, error in [(None, TypeError), (-1, ValueError), (math.nan, ValueError),
                       ("5", TypeError), (False, TypeError)]:  # fmt: skip
        with pytest.raises(error, match="rate_grace"):
            ServerTimeouts(rate_grace=bad)


def test_the_rates_reach_both_passive_limits_and_no_client_limits() -> None:
    s = ServerTimeouts(min_receive_rate=100, min_send_rate=None, rate_grace=2)
    for limits in (s._first_request_limits, s._keepalive_limits):
        assert (limits.receive_rate, limits.send_rate, limits.rate_grace) == (100, None, 2)
    client = Timeouts()._limits
    assert (client.receive_rate, client.send_rate) == (None, None)
    # A rate alone makes a connection's limits worth looking at.
    rate_only = ServerTimeouts(first_request=None, inactivity=None, keepalive=None)
    assert not rate_only.replace(min_send_rate=None)._keepalive_limits.unlimited
    assert not rate_only.replace(min_receive_rate=None)._keepalive_limits.unlimited
    none = rate_only.replace(min_receive_rate=None, min_send_rate=None)
    assert none._keepalive_limits.unlimited


@pytest.mark.parametrize(("cls", "defaults"), BOTH, ids=IDS)
def test_every_field_accepts_none_zero_and_numbers(cls: Any, defaults: dict[str, Any]) -> None:
    for name in defaults:
        for good in (None, 0, 0.5, 3, math.inf):
            assert getattr(cls(**{name: good}), name) == good


@pytest.mark.parametrize(("cls", "defaults"), BOTH, ids=IDS)
@pytest.mark.parametrize(
    ("bad", "error"),
    [(-1, ValueError), (-0.001, ValueError), (math.nan, ValueError), ("5", TypeError),
     (True, TypeError), ([1], TypeError)],
)  # fmt: skip
def test_bad_values_are_refused_naming_the_field(
    cls: Any, defaults: dict[str, Any], bad: object, error: type[Exception]
) -> None:
    for name in defaults:
        with pytest.raises(error, match=name):
            cls(**{name: bad})


@pytest.mark.parametrize(("cls", "defaults"), BOTH, ids=IDS)
def test_frozen_and_hashable(cls: Any, defaults: dict[str, Any]) -> None:
    value = cls()
    name = next(iter(defaults))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, name, 1)
    assert value == cls()
    assert hash(value) == hash(cls())
    assert value != value.replace(**{name: 123})
    assert len({cls(), cls(), value.replace(**{name: 123})}) == 2


def test_replace_changes_only_the_named_fields() -> None:
    base = Timeouts()
    changed = base.replace(connect=1.5, pool=2)
    assert type(changed) is Timeouts
    assert (changed.connect, changed.pool) == (1.5, 2)
    assert changed.keepalive == base.keepalive == 60
    assert base.connect == 10  # the original is untouched
    assert dataclasses.replace(base, connect=1.5, pool=2) == changed
    server = ServerTimeouts().replace(handshake=None)
    assert type(server) is ServerTimeouts
    assert server.handshake is None


def test_replace_validates() -> None:
    with pytest.raises(ValueError, match="keepalive"):
        Timeouts().replace(keepalive=-1)
    with pytest.raises(TypeError):
        Timeouts().replace(no_such_field=1)
    with pytest.raises(TypeError):
        ServerTimeouts().replace(connect=1)  # a client-only field


def test_client_and_server_values_are_distinct_types() -> None:
    assert Timeouts() != ServerTimeouts()
    with pytest.raises(TypeError):
        Timeouts(first_request=1)  # type: ignore[call-arg]
    assert "inactivity" in repr(Timeouts())


def test_connection_limits_are_built_once_per_value_and_follow_its_fields() -> None:
    # The client and server set a session's limits by assigning the Limits a
    # value built once; it must match the fields, survive copies and
    # pickling, and change nothing about equality, hashing or repr.
    import copy
    import pickle

    t = Timeouts(send=1, first_response=2, receive=3, inactivity=4)
    limits = t._limits
    assert t._limits is limits
    assert (limits.send, limits.first_phase, limits.first_timeout) == (1, "first_response", 2)
    assert (limits.receive, limits.inactivity, limits.unlimited) == (3, 4, False)
    assert t == Timeouts(send=1, first_response=2, receive=3, inactivity=4)
    assert hash(t) == hash(Timeouts(send=1, first_response=2, receive=3, inactivity=4))
    assert "_limits" not in repr(t)
    for other in (pickle.loads(pickle.dumps(t)), copy.deepcopy(t), copy.copy(t)):
        assert other == t
        assert other._limits.first_timeout == 2
    changed = t.replace(inactivity=None, send=None, first_response=None, receive=None)
    assert changed._limits.unlimited
    assert changed._limits is not limits
    assert t._limits is limits  # the original keeps its own

    s = ServerTimeouts(first_request=5, keepalive=6, send=7, receive=None, inactivity=None)
    first, later = s._first_request_limits, s._keepalive_limits
    assert (first.first_phase, first.first_timeout, first.send) == ("first_request", 5, 7)
    assert (later.first_phase, later.first_timeout, later.send) == ("keepalive", 6, 7)
    assert s._first_request_limits is first
    assert s._keepalive_limits is later
    assert pickle.loads(pickle.dumps(s)) == s
