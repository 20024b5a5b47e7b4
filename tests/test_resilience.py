"""The resilience decisions without I/O (nodeagent/proxy/l7/resilience.py): fed events, clock
and random draws, asserting what they decide."""

from __future__ import annotations

import pytest

from nodeagent.proxy.l7.resilience import (CONNECT_FAILURE, NO_FAULT, REFUSED_STREAM, RESET, TIMEOUT,
                                           DestinationPolicy, DestinationState, FaultPolicy, OutlierPolicy,
                                           OutlierTracker, RateLimitPolicy, ResilienceState, RetryPolicy,
                                           TokenBucket, retry_after_seconds, retry_after_value)

pytestmark = pytest.mark.timeout(30)


# ------------------------------------------------------------------ retry policy
def test_no_retry_policy_without_attempts():
    assert RetryPolicy.from_spec(None) is None
    assert RetryPolicy.from_spec({"attempts": 0}) is None


def test_retry_on_conditions():
    r = RetryPolicy.from_spec({"attempts": 2, "retryOn": ["5xx"]})
    assert r.retriable_status(500) and r.retriable_status(503) and not r.retriable_status(404)
    assert all(r.retriable_failure(x) for x in (CONNECT_FAILURE, RESET, TIMEOUT, REFUSED_STREAM))
    gw = RetryPolicy.from_spec({"attempts": 2, "retryOn": ["gateway-error"]})
    assert gw.retriable_status(502) and gw.retriable_status(504) and not gw.retriable_status(500)
    assert gw.retriable_failure(CONNECT_FAILURE) and gw.retriable_failure(TIMEOUT) and not gw.retriable_failure(RESET)
    codes = RetryPolicy.from_spec({"attempts": 1, "retryOn": ["retriable-status-codes"],
                                   "retriableStatusCodes": [429, 409]})
    assert codes.retriable_status(429) and codes.retriable_status(409) and not codes.retriable_status(503)
    cf = RetryPolicy.from_spec({"attempts": 1, "retryOn": ["connect-failure"]})
    assert cf.retriable_failure(CONNECT_FAILURE) and not cf.retriable_failure(RESET)
    assert not cf.retriable_status(503)
    grpc = RetryPolicy.from_spec({"attempts": 1, "retryOn": ["unavailable", "resource-exhausted"]})
    assert grpc.retriable_grpc(14) and grpc.retriable_grpc(8) and not grpc.retriable_grpc(4)


def test_default_retry_on_is_istios():
    r = RetryPolicy.from_spec({"attempts": 2})
    assert r.retriable_status(503) and not r.retriable_status(500)
    assert r.retriable_failure(CONNECT_FAILURE) and r.retriable_failure(REFUSED_STREAM)
    assert r.retriable_grpc(14) and r.retriable_grpc(1) and not r.retriable_grpc(4)


def test_idempotent_methods_only_by_default():
    r = RetryPolicy.from_spec({"attempts": 2})
    assert r.method_ok(b"GET") and r.method_ok(b"PUT") and not r.method_ok(b"POST")
    assert RetryPolicy.from_spec({"attempts": 2, "retryNonIdempotent": True}).method_ok(b"POST")


def test_backoff_is_full_jitter_exponential_capped_and_honours_short_retry_after():
    r = RetryPolicy.from_spec({"attempts": 5, "backoff": {"baseInterval": "100ms", "maxInterval": "300ms"}})
    assert r.backoff(1, 0.999) == pytest.approx(0.0999)
    assert r.backoff(2, 0.5) == pytest.approx(0.1)
    assert r.backoff(3, 0.999) == pytest.approx(0.2997)  # 400 ms capped at 300
    assert r.backoff(1, 0.0) == 0.0
    assert r.backoff(1, 0.5, retry_after=0.2) == 0.2
    assert r.backoff(1, 0.5, retry_after=5.0) is None  # longer than maxInterval: give the client the answer


def test_retry_after_parsing():
    assert retry_after_seconds([(b"retry-after", b"2")]) == 2.0
    assert retry_after_seconds([(b"retry-after", b"Wed, 21 Oct 2015 07:28:00 GMT")]) is None
    assert retry_after_seconds([(b"x", b"1")]) is None
    assert retry_after_value(0.01) == b"1" and retry_after_value(2.2) == b"3"


# ------------------------------------------------------------------ budget and breaker
def _dest(spec: dict) -> DestinationState:
    return DestinationState(("ns", "svc", 80), DestinationPolicy.from_traffic_policy(spec))


def test_budget_allows_min_concurrency_then_percent_of_active():
    d = _dest({"retries": {"attempts": 3, "budget": {"percent": 20, "minRetryConcurrency": 2}}})
    for _ in range(10):
        assert d.admit()
    assert d.may_retry() and d.may_retry()  # the minimum: 2
    assert not d.may_retry() and d.retry_overflow_total == 1
    for _ in range(10):
        assert d.admit()  # 20 active: 20 % = 4
    assert d.may_retry() and d.may_retry() and not d.may_retry()
    d.retry_done()
    assert d.may_retry()


def test_max_retries_caps_the_budget_and_max_requests_trips_the_breaker():
    d = _dest({"retries": {"attempts": 3}, "connectionPool": {"maxRequests": 2, "maxRetries": 1}})
    assert d.admit() and d.admit() and not d.admit()
    assert d.overflow_total == 1
    assert d.may_retry() and not d.may_retry()
    d.request_done()
    assert d.admit()


def test_no_destination_policy_without_resilience_sections():
    assert DestinationPolicy.from_traffic_policy(None) is None
    assert DestinationPolicy.from_traffic_policy({"loadBalancer": {"type": "RANDOM"}}) is None
    assert DestinationPolicy.from_traffic_policy({"connectionPool": {"maxConnections": 3}}) is None
    assert DestinationPolicy.from_traffic_policy({"connectionPool": {"maxRequests": 3}}).max_requests == 3


# ------------------------------------------------------------------ outlier detection
def test_consecutive_5xx_ejects_for_base_time_times_ejections_and_returns():
    o = OutlierTracker(OutlierPolicy(consecutive_5xx=3, base_ejection=30, interval=10, max_ejection_percent=50))
    ep = ("10.0.0.1", 80)
    assert not o.failure(ep, 500, 4, 0.0) and not o.failure(ep, 503, 4, 1.0)
    assert o.failure(ep, 500, 4, 2.0)
    assert o.ejected == {ep} and o.next_review == 32.0
    assert o.review(31.0) == [] and o.review(32.0) == [ep]
    assert not o.ejected
    for t in (33.0, 34.0, 35.0):  # the second ejection lasts twice as long
        o.failure(ep, 502, 4, t)
    assert o.records[ep].ejected_until == 35.0 + 60.0


def test_success_resets_the_count_and_4xx_is_not_an_error():
    o = OutlierTracker(OutlierPolicy(consecutive_5xx=2))
    ep = ("10.0.0.1", 80)
    o.failure(ep, 500, 4, 0.0)
    o.success(ep)
    assert not o.failure(ep, 500, 4, 1.0)
    assert not o.failure(ep, 404, 4, 2.0) and not o.failure(ep, 500, 4, 3.0)


def test_gateway_errors_count_separately():
    o = OutlierTracker(OutlierPolicy(consecutive_5xx=0, consecutive_gateway=2))
    ep = ("10.0.0.1", 80)
    assert not o.failure(ep, 500, 4, 0.0) and not o.failure(ep, 503, 4, 0.0)
    assert o.failure(ep, 0, 4, 0.0)  # a local failure (connect, reset, timeout) is a gateway error


def test_max_ejection_percent_bounds_ejections_but_one_is_always_allowed():
    o = OutlierTracker(OutlierPolicy(consecutive_5xx=1, max_ejection_percent=10))
    a, b = ("10.0.0.1", 80), ("10.0.0.2", 80)
    assert o.failure(a, 500, 2, 0.0)
    assert not o.failure(b, 500, 2, 0.0) and o.overflow_total == 1


def test_ejection_multiplier_decays_after_healthy_intervals():
    o = OutlierTracker(OutlierPolicy(consecutive_5xx=1, base_ejection=10, interval=5, max_ejection_percent=100))
    ep = ("10.0.0.1", 80)
    o.failure(ep, 500, 1, 0.0)
    o.review(10.0)
    assert o.records[ep].ejections == 1 and o.next_review == 15.0
    o.review(15.0)
    assert o.records[ep].ejections == 0


def test_destination_observe_uses_the_tracker():
    d = _dest({"outlierDetection": {"consecutive5xxErrors": 2, "maxEjectionPercent": 100}})
    ep = ("10.0.0.1", 80)
    assert not d.observe(ep, 503, 3, 0.0) and d.observe(ep, 0, 3, 0.1)
    assert d.describe()["outlier"]["ejected"] == 1


# ------------------------------------------------------------------ rate limits
def test_token_bucket_burst_then_rate():
    b = TokenBucket(10.0, 5.0, 0.0)
    assert [b.take(0.0) for _ in range(5)] == [0.0] * 5
    assert b.take(0.0) == pytest.approx(0.1)
    assert b.take(0.1) == 0.0 and b.take(0.1) > 0


def test_rate_limit_per_source_and_share():
    p = RateLimitPolicy.from_spec({"requestsPerUnit": 60, "unit": "minute", "perSourceWorkload": True}, share=0.5)
    assert p.rate == pytest.approx(0.5) and p.burst == 30.0 and p.per_source
    d = _dest({"rateLimit": {"requestsPerUnit": 1, "unit": "second", "perSourceWorkload": True}})
    assert d.rate_limit("ns/a", 0.0) == 0.0 and d.rate_limit("ns/a", 0.0) > 0
    assert d.rate_limit("ns/b", 0.0) == 0.0
    assert d.rate_limited_total == 1


def test_rate_limit_with_burst():
    d = _dest({"rateLimit": {"requestsPerUnit": 10, "unit": "second", "burst": 2}})
    assert [d.rate_limit("", 0.0) == 0.0 for _ in range(3)] == [True, True, False]


def test_state_survives_snapshots_and_resets_changed_sections():
    rs = ResilienceState()
    key = ("ns", "svc", 80)
    spec = {"outlierDetection": {"consecutive5xxErrors": 1, "maxEjectionPercent": 100},
            "rateLimit": {"requestsPerUnit": 1, "unit": "second"}}
    st = rs.get(key, DestinationPolicy.from_traffic_policy(spec))
    st.observe(("10.0.0.1", 80), 500, 2, 0.0)
    st.rate_limit("", 0.0)
    again = rs.get(key, DestinationPolicy.from_traffic_policy(spec))  # a new snapshot, same policy
    assert again is st and st.outlier.ejected and st.rate_limit("", 0.0) > 0
    spec2 = dict(spec, rateLimit={"requestsPerUnit": 5, "unit": "second"})
    rs.get(key, DestinationPolicy.from_traffic_policy(spec2))
    assert st.rate_limit("", 0.0) == 0.0 and st.outlier.ejected  # a new bucket; ejections kept
    rs.retain([])
    assert rs.peek(key) is None


# ------------------------------------------------------------------ faults
def test_fault_percentages_and_headers():
    f = FaultPolicy.from_spec({"delay": {"percentage": 30, "fixedDelay": "200ms"},
                               "abort": {"percentage": 50, "httpStatus": 503},
                               "headers": [{"name": "X-Chaos", "value": "on"}]})
    on = [(b"x-chaos", b"on")]
    assert f.decide([], 0.0, 0.0) is NO_FAULT
    assert f.decide(on, 0.29, 0.9).delay == 0.2 and not f.decide(on, 0.29, 0.9).aborts
    assert f.decide(on, 0.3, 0.49).abort_status == 503 and f.decide(on, 0.3, 0.49).delay == 0
    assert f.decide(on, 0.5, 0.5) is NO_FAULT
    g = FaultPolicy.from_spec({"abort": {"percentage": 100, "grpcStatus": 14}})
    d = g.decide([], 0.999, 0.999)
    assert d.abort_grpc == 14 and d.abort_status == 0 and d.aborts
    assert FaultPolicy.from_spec({"abort": {"percentage": 0, "httpStatus": 500}}).decide([], 0.0, 0.0) is NO_FAULT


def test_fault_percentages_land_within_tolerance_over_many_draws():
    import random
    rnd = random.Random(7)
    f = FaultPolicy.from_spec({"abort": {"percentage": 30, "httpStatus": 500}})
    n = sum(f.decide([], rnd.random(), rnd.random()).aborts for _ in range(10000))
    assert 2800 < n < 3200


def test_worker_processes_split_limits_rounding_down_but_never_to_zero():
    p = DestinationPolicy.from_traffic_policy({"connectionPool": {"maxRequests": 5, "maxRetries": 1},
                                               "rateLimit": {"requestsPerUnit": 10, "unit": "second"}}, share=0.5)
    assert p.max_requests == 2 and p.max_retries == 1 and p.rate.rate == 5.0 and p.rate.burst == 5.0


def test_merged_views_sum_counts_and_shares_but_not_settings():
    from nodeagent.proxy.l7.resilience import merge_state_views, state_view
    views = []
    for _ in range(2):
        rs = ResilienceState()
        st = rs.get(("ns", "svc", 80), DestinationPolicy.from_traffic_policy(
            {"retries": {"attempts": 2}, "connectionPool": {"maxRequests": 4},
             "outlierDetection": {"consecutive5xxErrors": 1, "maxEjectionPercent": 100}}, share=0.5))
        st.count_retry("5xx")
        st.observe(("10.0.0.1", 80), 500, 2, 0.0)
        views.append(state_view(rs, 1.0))
    m = merge_state_views(views)["ns/svc/80"]
    s = m["summary"]
    assert s["retry"]["attempts"] == 2 and s["retry"]["minRetryConcurrency"] == 3
    assert s["retries"] == {"5xx": 2} and s["maxRequests"] == 4
    assert m["endpoints"]["10.0.0.1:80"]["ejected"] and m["endpoints"]["10.0.0.1:80"]["ejections"] == 2
