"""Upstream selection policies, fuses and half-open trials (no I/O: MockClock only)."""

from __future__ import annotations

import collections

import pytest
import trio

from triocomm import UpstreamUnavailable
from triocomm._upstream import Upstream


def pick_many(up: Upstream[str], n: int, key: object = None) -> list[str]:
    out = []
    for _ in range(n):
        t = up._select(key)
        up._finished(t, True)
        out.append(t)
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
    first = up._select()
    second = up._select()
    third = up._select()
    assert {first, second, third} == {"a", "b", "c"}
    up._finished(second, True)
    assert up._select() == second


async def test_consistent_hash_is_stable_for_a_key() -> None:
    up = Upstream([f"host{i}:6379" for i in range(5)], policy="consistent_hash")
    for key in ("user:1", "user:2", b"bytes-key", 42):
        assert len(set(pick_many(up, 5, key=key))) == 1


async def test_consistent_hash_needs_a_key() -> None:
    up = Upstream(["a", "b"], policy="consistent_hash")
    with pytest.raises(ValueError, match="key="):
        up._select()


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
    t = up._select(key=keys[0])
    up._finished(t, False)  # fuses before[keys[0]]
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
        assert up._select(exclude=["b"]) == "a"
        up._finished("a", False)
    assert up.stats()["a"].fused_until == pytest.approx(trio.current_time() + 5.0)
    # Fused: everything goes to b, and with b excluded nothing is available.
    assert pick_many(up, 3) == ["b", "b", "b"]
    with pytest.raises(UpstreamUnavailable, match="1 of 2 fused"):
        up._select(exclude=["b"])

    await trio.sleep(5.0)
    # Half-open: exactly one trial goes through.
    assert up._select(exclude=["b"]) == "a"
    assert up.stats()["a"].trial
    with pytest.raises(UpstreamUnavailable):
        up._select(exclude=["b"])
    up._finished("a", False)  # the trial failed: fused again at once
    assert up.stats()["a"].fused_until == pytest.approx(trio.current_time() + 5.0)
    with pytest.raises(UpstreamUnavailable):
        up._select(exclude=["b"])

    await trio.sleep(5.0)
    assert up._select(exclude=["b"]) == "a"
    up._finished("a", True)  # the trial succeeded: the fuse closes
    st = up.stats()["a"]
    assert (st.fused_until, st.trial, st.consecutive_failures) == (None, False, 0)
    assert pick_many(up, 4) == ["a", "b", "a", "b"]


async def test_success_resets_consecutive_failures() -> None:
    up = Upstream(["a"], max_fails=3)
    for ok in (False, False, True, False, False):
        up._finished(up._select(), ok)
    st = up.stats()["a"]
    assert st.fused_until is None
    assert (st.sessions, st.failures, st.consecutive_failures, st.in_flight) == (5, 4, 2, 0)


async def test_neutral_outcome_does_not_count() -> None:
    up = Upstream(["a"], max_fails=1)
    up._finished(up._select(), None)
    assert up.stats()["a"].failures == 0
    assert up.stats()["a"].fused_until is None


async def test_all_fused_fails_at_once() -> None:
    up = Upstream(["a", "b"], max_fails=1, fuse_time=30)
    up._finished(up._select(), False)
    up._finished(up._select(), False)
    with pytest.raises(UpstreamUnavailable, match="2 of 2 fused"):
        up._select()


async def test_retry_excludes_tried_addresses() -> None:
    up = Upstream(["a", "b", "c"], policy="consistent_hash")
    tried: list[str] = []
    for _ in range(3):
        t = up._select(key="same", exclude=tried)
        up._finished(t, False)
        tried.append(t)
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
    t = up._select()
    up.remove(t)
    up._finished(t, False)  # an attempt on a removed address ends quietly
    assert t not in up.stats()


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="policy"):
        Upstream(["a"], policy="fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        Upstream([])
    with pytest.raises(ValueError, match="weights given"):
        Upstream(["a", "b"], weights=[1])
    with pytest.raises(ValueError, match="max_fails"):
        Upstream(["a"], max_fails=0)
