"""Upstream selection policies, fuses and half-open trials (no I/O: MockClock only)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from triocomm import UpstreamUnavailable
from triocomm._upstream import Upstream, UpstreamAttempt


def pick_many(up: Upstream[str], n: int, key: object = None) -> list[str]:
    out = []
    for _ in range(n):
        attempt = up.choose(key)
        attempt.settle(True)
        out.append(attempt.target)
    return out


async def test_round_robin_rotates_in_order() -> None:
    up = Upstream(["a", "b", "c"])
    assert pick_many(up, 7) == ["a", "b", "c", "a", "b", "c", "a"]


async def test_smooth_weighted_round_robin_is_exact_and_spread() -> None:
    up = Upstream(["a", "b", "c"], weights=[5, 1, 1])
    picks = pick_many(up, 70)
    assert collections.Counter(picks) == {"a": 50, "b": 10, "c": 10}
    # Smooth: the heavy address never runs more than its weight in a row.
    longest = max(len(run) for run in "".join(picks).replace("b", " ").replace("c", " ").split())
    assert longest <= 5


async def test_weighted_random_follows_weights() -> None:
    up = Upstream(["a", "b"], policy="weighted_random", weights={"a": 3, "b": 1})
    counts = collections.Counter(pick_many(up, 4000))
    assert 0.70 < counts["a"] / 4000 < 0.80


async def test_least_connections_prefers_fewest_in_flight() -> None:
    up = Upstream(["a", "b", "c"], policy="least_connections")
    first = up.choose()
    second = up.choose()
    third = up.choose()
    assert {first.target, second.target, third.target} == {"a", "b", "c"}
    second.settle(True)
    assert up.choose().target == second.target


async def test_consistent_hash_is_stable_for_a_key() -> None:
    up = Upstream([f"host{i}:6379" for i in range(5)], policy="consistent_hash")
    for key in ("user:1", "user:2", b"bytes-key", 42):
        assert len(set(pick_many(up, 5, key=key))) == 1


async def test_consistent_hash_needs_a_key() -> None:
    up = Upstream(["a", "b"], policy="consistent_hash")
    with pytest.raises(ValueError, match="key="):
        up.choose()


@pytest.mark.parametrize("n", [4, 8])
async def test_consistent_hash_moves_about_one_nth_of_keys(n: int) -> None:
    targets = [f"10.0.0.{i}:11211" for i in range(n)]
    keys = [f"key-{i}" for i in range(4000)]
    up = Upstream(targets, policy="consistent_hash")
    before = {k: pick_many(up, 1, key=k)[0] for k in keys}

    up.add("10.0.0.99:11211")
    after_add = {k: pick_many(up, 1, key=k)[0] for k in keys}
    moved = [k for k in keys if before[k] != after_add[k]]
    # Only keys that now belong to the new address move, about 1/(n+1) of them.
    assert all(after_add[k] == "10.0.0.99:11211" for k in moved)
    assert 0.5 / (n + 1) < len(moved) / len(keys) < 1.6 / (n + 1)

    up.remove("10.0.0.99:11211")
    up.remove(targets[0])
    after_remove = {k: pick_many(up, 1, key=k)[0] for k in keys}
    moved = [k for k in keys if before[k] != after_remove[k]]
    assert all(before[k] == targets[0] for k in moved)
    assert 0.5 / n < len(moved) / len(keys) < 1.6 / n


async def test_consistent_hash_skips_a_fused_address_without_moving_others() -> None:
    up = Upstream(["a", "b", "c"], policy="consistent_hash", max_fails=1)
    keys = [f"k{i}" for i in range(300)]
    before = {k: pick_many(up, 1, key=k)[0] for k in keys}
    attempt = up.choose(key=keys[0])
    attempt.settle(False)  # fuses before[keys[0]]
    t = attempt.target
    after = {k: pick_many(up, 1, key=k)[0] for k in keys}
    for k in keys:
        if before[k] != t:
            assert after[k] == before[k]
        else:
            assert after[k] != t


async def test_fuse_after_max_fails_then_half_open_trial(
    autojump_clock: trio.testing.MockClock,
) -> None:
    up = Upstream(["a", "b"], max_fails=2, fuse_time=5.0)
    for _ in range(2):
        attempt = up.choose(exclude=["b"])
        assert attempt.target == "a"
        attempt.settle(False)
    assert up.stats()["a"].fused_until == pytest.approx(trio.current_time() + 5.0)
    # Fused: everything goes to b, and with b excluded nothing is available.
    assert pick_many(up, 3) == ["b", "b", "b"]
    with pytest.raises(UpstreamUnavailable, match="1 of 2 fused"):
        up.choose(exclude=["b"])

    await trio.sleep(5.0)
    # Half-open: exactly one trial goes through.
    trial = up.choose(exclude=["b"])
    assert trial.target == "a"
    assert up.stats()["a"].trial
    with pytest.raises(UpstreamUnavailable):
        up.choose(exclude=["b"])
    trial.settle(False)  # the trial failed: fused again at once
    assert up.stats()["a"].fused_until == pytest.approx(trio.current_time() + 5.0)
    with pytest.raises(UpstreamUnavailable):
        up.choose(exclude=["b"])

    await trio.sleep(5.0)
    trial = up.choose(exclude=["b"])
    assert trial.target == "a"
    trial.settle(True)  # the trial succeeded: the fuse closes
    st = up.stats()["a"]
    assert (st.fused_until, st.trial, st.consecutive_failures) == (None, False, 0)
    assert pick_many(up, 4) == ["a", "b", "a", "b"]


async def test_success_resets_consecutive_failures() -> None:
    up = Upstream(["a"], max_fails=3)
    for ok in (False, False, True, False, False):
        up.choose().settle(ok)
    st = up.stats()["a"]
    assert st.fused_until is None
    assert (st.sessions, st.failures, st.consecutive_failures, st.in_flight) == (5, 4, 2, 0)


async def test_neutral_outcome_does_not_count() -> None:
    up = Upstream(["a"], max_fails=1)
    up.choose().settle(None)
    assert up.stats()["a"].failures == 0
    assert up.stats()["a"].fused_until is None


async def test_all_fused_fails_at_once() -> None:
    up = Upstream(["a", "b"], max_fails=1, fuse_time=30)
    up.choose().settle(False)
    up.choose().settle(False)
    with pytest.raises(UpstreamUnavailable, match="2 of 2 fused"):
        up.choose()


async def test_retry_excludes_tried_addresses() -> None:
    up = Upstream(["a", "b", "c"], policy="consistent_hash")
    tried: list[str] = []
    for _ in range(3):
        attempt = up.choose(key="same", exclude=tried)
        attempt.settle(False)
        tried.append(attempt.target)
    assert sorted(tried) == ["a", "b", "c"]


async def test_add_remove_validation() -> None:
    up = Upstream(["a"])
    with pytest.raises(ValueError, match="already"):
        up.add("a")
    with pytest.raises(ValueError, match="weight"):
        up.add("b", 0)
    with pytest.raises(ValueError, match="last target"):
        up.remove("a")
    with pytest.raises(KeyError):
        up.remove("zzz")
    up.add("b", 2)
    assert up.targets == ["a", "b"]
    attempt = up.choose()
    up.remove(attempt.target)
    attempt.settle(False)  # an attempt on a removed address ends quietly
    assert attempt.target not in up.stats()


# -- attempts settle with the entry they started on -------------------------------


async def test_an_attempt_settles_on_the_entry_it_started_on() -> None:
    up = Upstream(["a", "b"], policy="least_connections", max_fails=1)
    old = up.choose()
    assert old.target == "a"
    up.remove("a")
    up.add("a")
    old.settle(False)  # the old entry's failure: the new one is untouched
    st = up.stats()["a"]
    assert (st.sessions, st.in_flight, st.failures, st.fused_until) == (0, 0, 0, None)
    # least_connections still spreads sessions: "a" is not at -1 in flight.
    picks = [up.choose().target for _ in range(4)]
    assert sorted(picks) == ["a", "a", "b", "b"]
    assert all(st.in_flight == 2 for st in up.stats().values())


async def test_only_the_trial_ends_the_half_open_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    up = Upstream(["a"], max_fails=1, fuse_time=5.0)
    early = up.choose()  # started before the fuse blew: not the trial
    up.choose().settle(False)
    await trio.sleep(5.0)
    trial = up.choose()
    early.settle(None)
    assert up.stats()["a"].trial
    with pytest.raises(UpstreamUnavailable):
        up.choose()  # still one trial at a time
    trial.settle(True)
    st = up.stats()["a"]
    assert (st.trial, st.fused_until, st.in_flight) == (False, None, 0)


async def test_an_attempt_settles_once() -> None:
    up = Upstream(["a"])
    attempt = up.choose()
    attempt.settle(True)
    with pytest.raises(RuntimeError, match="already settled"):
        attempt.settle(False)
    assert up.stats()["a"].in_flight == 0
    assert "settled" in repr(attempt)


@dataclass
class _Entry:
    """The reference model of one address entry (one add of the address)."""

    weight: int
    consecutive: int = 0
    fused_until: float | None = None
    trial: bool = False
    started: int = 0
    failed: int = 0
    open: set[int] = field(default_factory=set)  # attempts in flight on it


_ADDRESSES = ["a", "b", "c"]
_MAX_FAILS = 2
_FUSE_TIME = 5.0


def _check(up: Upstream[str], model: dict[str, _Entry]) -> None:
    stats = up.stats()
    assert sorted(stats) == sorted(model)
    for address, ref in model.items():
        got = stats[address]
        assert got.in_flight == len(ref.open) >= 0
        assert (got.sessions, got.failures, got.weight) == (ref.started, ref.failed, ref.weight)
        assert (got.consecutive_failures, got.trial) == (ref.consecutive, ref.trial)
        assert got.fused_until == ref.fused_until


def _available(ref: _Entry, now: float) -> bool:
    return ref.fused_until is None or (now >= ref.fused_until and not ref.trial)


def _settle_reference(ref: _Entry, trial: bool, ok: bool | None, now: float) -> None:
    if trial:
        ref.trial = False
    if ok is True:
        ref.consecutive, ref.fused_until = 0, None
    elif ok is False:
        ref.failed += 1
        ref.consecutive += 1
        if trial or ref.consecutive >= _MAX_FAILS:
            ref.fused_until = now + _FUSE_TIME


async def _run_model(data: st.DataObject, clock: trio.testing.MockClock) -> None:
    up = Upstream(
        _ADDRESSES, policy="least_connections", max_fails=_MAX_FAILS, fuse_time=_FUSE_TIME
    )
    model = {address: _Entry(weight=1) for address in _ADDRESSES}
    running: list[tuple[UpstreamAttempt[str], _Entry, bool, int]] = []
    for number in range(data.draw(st.integers(0, 60), label="steps")):
        now = trio.current_time()
        op = data.draw(st.sampled_from(["choose", "settle", "remove", "add", "sleep"]))
        address = data.draw(st.sampled_from(_ADDRESSES))
        if op == "choose":
            exclude = {address} if data.draw(st.booleans()) else set()
            eligible = {a: r for a, r in model.items() if a not in exclude and _available(r, now)}
            if not eligible:
                with pytest.raises(UpstreamUnavailable):
                    up.choose(exclude=exclude)
                continue
            attempt = up.choose(exclude=exclude)
            ref = eligible[attempt.target]
            load = {a: len(r.open) / r.weight for a, r in eligible.items()}
            assert load[attempt.target] == min(load.values())  # least_connections
            trial = ref.fused_until is not None
            ref.trial = ref.trial or trial
            ref.started += 1
            ref.open.add(number)
            running.append((attempt, ref, trial, number))
        elif op == "settle" and running:
            index = data.draw(st.integers(0, len(running) - 1))
            attempt, ref, trial, started = running.pop(index)
            ok = data.draw(st.sampled_from([True, False, None]))
            attempt.settle(ok)
            ref.open.discard(started)
            _settle_reference(ref, trial, ok, now)
        elif op == "remove" and address in model and len(model) > 1:
            up.remove(address)
            del model[address]
        elif op == "add" and address not in model:
            weight = data.draw(st.integers(1, 3))
            up.add(address, weight)
            model[address] = _Entry(weight=weight)
        elif op == "sleep":
            clock.jump(data.draw(st.sampled_from([1.0, _FUSE_TIME])))
        _check(up, model)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_bookkeeping_matches_a_reference_through_remove_and_add(data: st.DataObject) -> None:
    # Random interleavings of choose / settle / remove / add / time passing:
    # every entry's counters equal a reference that counts only the attempts
    # started on that entry, and in_flight is never negative.
    clock = trio.testing.MockClock()
    trio.run(_run_model, data, clock, clock=clock)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="policy"):
        Upstream(["a"], policy="fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        Upstream([])
    with pytest.raises(ValueError, match="weights given"):
        Upstream(["a", "b"], weights=[1])
    with pytest.raises(ValueError, match="max_fails"):
        Upstream(["a"], max_fails=0)
