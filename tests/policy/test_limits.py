"""Token buckets and counters: pure, time injected, parameters passed per call."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eyewall.policy.limits import Counter, Limited, TokenBuckets


def test_bucket_grants_a_burst_then_limits_with_retry_after() -> None:
    buckets = TokenBuckets("client_rps")
    assert [buckets.take("k", 10.0, 2.0, 3) for _ in range(3)] == [None] * 3
    limited = buckets.take("k", 10.0, 2.0, 3)
    assert limited == Limited("client_rps", "k", 0.5)
    assert limited.describe() == "rate limit client_rps reached for k"
    assert buckets.take("k", 10.25, 2.0, 3) is not None  # half a token so far
    assert buckets.take("k", 10.5, 2.0, 3) is None  # one token after 1 / rate
    assert buckets.take("k", 10.5, 2.0, 3) is not None


def test_bucket_refills_over_time_up_to_the_burst() -> None:
    buckets = TokenBuckets("r")
    buckets.take("k", 0.0, 1.0, 2)
    buckets.take("k", 0.0, 1.0, 2)
    assert buckets.take("k", 0.0, 1.0, 2) is not None
    granted = [buckets.take("k", 1000.0, 1.0, 2) is None for _ in range(3)]
    assert granted == [True, True, False]


def test_new_parameters_apply_to_tokens_already_spent() -> None:
    """A reload that lowers the rate keeps what was spent (the state outlives it)."""
    buckets = TokenBuckets("r")
    for _ in range(10):
        assert buckets.take("k", 0.0, 10.0, 10) is None
    assert buckets.take("k", 0.0, 1.0, 2) is not None  # spent, whatever the new burst
    assert buckets.take("k", 1.0, 1.0, 2) is None


def test_bucket_keys_are_independent() -> None:
    buckets = TokenBuckets("r")
    assert buckets.take("a", 0.0, 1.0, 1) is None
    assert buckets.take("a", 0.0, 1.0, 1) is not None
    assert buckets.take("b", 0.0, 1.0, 1) is None


def test_bucket_memory_is_bounded_forgetting_full_buckets_first() -> None:
    buckets = TokenBuckets("r", max_keys=10)
    for i in range(5):
        buckets.take(f"busy{i}", 0.0, 1.0, 3)
        buckets.take(f"busy{i}", 0.0, 1.0, 3)
    for i in range(100):
        buckets.take(f"k{i}", float(i), 1.0, 3)
    assert len(buckets) <= 10


@given(
    rate=st.floats(min_value=0.1, max_value=50.0),
    burst=st.integers(min_value=1, max_value=20),
    steps=st.lists(st.floats(min_value=0.0, max_value=3.0), min_size=1, max_size=150),
)
def test_granted_tokens_never_exceed_burst_plus_refill(
    rate: float, burst: int, steps: list[float]
) -> None:
    buckets = TokenBuckets("r")
    start = now = 1000.0
    granted = 0
    for step in steps:
        now += step
        limited = buckets.take("k", now, rate, burst)
        if limited is None:
            granted += 1
        else:
            assert 0 < limited.retry_after <= 1 / rate + 1e-9
        assert granted <= burst + rate * (now - start) + 1e-6


def test_counter_maximum_and_release() -> None:
    tunnels = Counter("client_tunnels")
    assert tunnels.acquire("a", 2) is None and tunnels.acquire("a", 2) is None
    limited = tunnels.acquire("a", 2)
    assert limited is not None and (limited.limit, limited.key) == ("client_tunnels", "a")
    assert tunnels.acquire("b", 2) is None
    tunnels.release("a")
    assert tunnels.count("a") == 1 and tunnels.acquire("a", 2) is None
    for _ in range(5):
        tunnels.release("b")
    assert tunnels.count("b") == 0  # never negative
    assert tunnels.acquire("b", 2) is None and tunnels.acquire("b", 2) is None
    assert tunnels.acquire("b", 2) is not None
    assert tunnels.total() == 4


@pytest.mark.parametrize("maximum", [0])
def test_counter_zero_means_unlimited(maximum: int) -> None:
    counter = Counter("c")
    assert all(counter.acquire("k", maximum) is None for _ in range(1000))
    assert counter.count("k") == 1000
