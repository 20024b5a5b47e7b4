"""Resilience decisions without I/O: retries and their budget, outlier ejection, local rate
limits, circuit-breaker counts and fault injection.

The HTTP drivers (``http1_proxy``, ``http2_proxy``) feed these objects what happened and do
what they answer; nothing here reads a clock or a socket (``now`` and random draws are
passed in), so every rule is tested by feeding events (tests/test_resilience.py).

* ``DestinationPolicy`` — what a TrafficPolicy says about one destination Service
  (``retries``, ``outlierDetection``, ``rateLimit``, ``connectionPool.maxRequests`` /
  ``maxRetries``), compiled once per snapshot. ``None`` where a Service has no such
  section, so a request to it pays one attribute check.
* ``DestinationState`` — the live counters of one destination in one proxy process:
  requests and retries in flight (breaker, budget), the token buckets, the outlier
  tracker, and the counts ``/clusters`` and the metrics show. Kept across snapshots
  (``ResilienceState``, keyed like ``LbState``).
* ``FaultPolicy`` — a FaultInjection compiled: ``decide(headers, draw, draw)``.

Semantics follow Envoy where it has them (the field names are Istio's):

* retries: ``attempts`` retries after the first try, each on another endpoint when there is
  one; full-jitter exponential backoff (``baseInterval`` 25 ms, ``maxInterval`` 250 ms); a
  ``Retry-After`` of at most ``maxInterval`` is honoured, a longer one ends the retries
  (the client gets the answer and its ``Retry-After``). Only idempotent methods unless
  ``retryNonIdempotent``; gRPC calls (all POSTs) are retried on the retryOn conditions. The budget: retries in flight (backing off or sent) may not
  exceed ``budget.percent`` (20) % of the destination's requests in flight, or
  ``budget.minRetryConcurrency`` (3), whichever is larger; ``connectionPool.maxRetries``
  caps them absolutely. A refused retry is counted (``overflow``) and the failure goes
  to the client as it is.
* outlier detection: ``consecutive5xxErrors`` (5; any 5xx answer, a connect failure, a
  reset or a timeout) and ``consecutiveGatewayErrors`` (off; 502/503/504 and the same
  local failures) eject the endpoint for ``baseEjectionTime`` x its ejection count;
  ``maxEjectionPercent`` (10) of the endpoints at most, but always one (Envoy). Each
  ``interval`` an ejected endpoint whose time is up returns, and an endpoint that stayed
  in for a whole interval has its ejection count lowered by one.
* rate limit: a token bucket of ``burst`` (default ``requestsPerUnit``) tokens refilled at
  ``requestsPerUnit`` per ``unit``, per destination or per source workload.
* worker processes: each keeps its own state, so each enforces its ``share`` (1 / the
  processes sharing the listeners) of the node's rate limits, ``maxRequests`` and
  ``maxRetries`` (rounded down, at least 1: together they never exceed a limit that is at
  least the number of processes). SO_REUSEPORT spreads connections evenly, not requests:
  one busy keep-alive connection meets its process's share, not the node's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes")
DEFAULT_RETRIABLE_CODES = (503,)
DEFAULT_BASE_INTERVAL = 0.025
DEFAULT_BUDGET_PERCENT = 20.0
DEFAULT_MIN_RETRY_CONCURRENCY = 3

# gRPC statuses by retryOn name
_GRPC_RETRY_ON = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8, "internal": 13, "unavailable": 14}

# why a try failed without an HTTP answer (the drivers' flags)
CONNECT_FAILURE = "UF"
RESET = "UC"
TIMEOUT = "UT"
REFUSED_STREAM = "REFUSED"

_UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
_MAX_SOURCE_BUCKETS = 4096


def _duration(value: Any, default: float) -> float:
    from nodeagent.proxy.l7.routing import parse_duration
    if value is None:
        return default
    try:
        return parse_duration(value) or default
    except ValueError:
        return default  # the control plane validated it


# ------------------------------------------------------------------ retries

@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int
    per_try_timeout: float = 0.0  # 0: none
    retry_on: frozenset[str] = frozenset(DEFAULT_RETRY_ON)
    codes: frozenset[int] = frozenset(DEFAULT_RETRIABLE_CODES)
    base_interval: float = DEFAULT_BASE_INTERVAL
    max_interval: float = DEFAULT_BASE_INTERVAL * 10
    non_idempotent: bool = False
    budget_percent: float = DEFAULT_BUDGET_PERCENT
    min_concurrency: int = DEFAULT_MIN_RETRY_CONCURRENCY
    grpc_statuses: frozenset[int] = frozenset()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> "RetryPolicy | None":
        if not spec or not int(spec.get("attempts") or 0):
            return None
        retry_on = frozenset(spec.get("retryOn") or DEFAULT_RETRY_ON)
        backoff = spec.get("backoff") or {}
        base = _duration(backoff.get("baseInterval"), DEFAULT_BASE_INTERVAL)
        budget = spec.get("budget") or {}
        codes = spec.get("retriableStatusCodes")
        if codes is None:
            codes = DEFAULT_RETRIABLE_CODES if "retriable-status-codes" in retry_on else ()
        return cls(
            attempts=int(spec["attempts"]),
            per_try_timeout=_duration(spec.get("perTryTimeout"), 0.0),
            retry_on=retry_on,
            # every status below 500 worth a retry is in codes (the drivers skip the check without)
            codes=(frozenset(int(c) for c in codes) if "retriable-status-codes" in retry_on else frozenset())
            | (frozenset({409}) if "retriable-4xx" in retry_on else frozenset()),
            base_interval=base,
            max_interval=max(base, _duration(backoff.get("maxInterval"), base * 10)),
            non_idempotent=bool(spec.get("retryNonIdempotent", False)),
            budget_percent=float(budget.get("percent", DEFAULT_BUDGET_PERCENT)),
            min_concurrency=int(budget.get("minRetryConcurrency", DEFAULT_MIN_RETRY_CONCURRENCY)),
            grpc_statuses=frozenset(code for name, code in _GRPC_RETRY_ON.items() if name in retry_on),
        )

    def method_ok(self, method: bytes, grpc: bool = False) -> bool:
        """Every gRPC call is a POST: its retryOn statuses are the opt-in (as Envoy and
        gRPC's own retry policy, which never look at the method)."""
        return grpc or self.non_idempotent or method in IDEMPOTENT

    def retriable_status(self, status: int) -> bool:
        """An HTTP answer worth another try."""
        on = self.retry_on
        if status >= 500 and "5xx" in on:
            return True
        if status in (502, 503, 504) and "gateway-error" in on:
            return True
        if status == 409 and "retriable-4xx" in on:
            return True
        return status in self.codes

    def retriable_grpc(self, grpc_status: int) -> bool:
        """A gRPC trailers-only answer worth another try."""
        return grpc_status in self.grpc_statuses

    def retriable_failure(self, reason: str) -> bool:
        """A try that ended without an answer: ``CONNECT_FAILURE``, ``RESET``, ``TIMEOUT``
        (the per-try timeout) or ``REFUSED_STREAM`` (HTTP/2: never processed)."""
        on = self.retry_on
        if "5xx" in on:
            return True
        if reason == CONNECT_FAILURE:
            return "connect-failure" in on or "gateway-error" in on
        if reason == RESET:
            return "reset" in on
        if reason == TIMEOUT:
            return "gateway-error" in on or "reset" in on
        if reason == REFUSED_STREAM:
            return "refused-stream" in on or "reset" in on
        return False

    def backoff(self, retry_number: int, draw: float, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retry ``retry_number`` (1 for the first), ``draw`` in [0, 1);
        ``None``: do not retry (the upstream asked for a longer pause than ``max_interval``)."""
        if retry_after is not None:
            return retry_after if retry_after <= self.max_interval else None
        ceiling = min(self.max_interval, self.base_interval * (2 ** min(retry_number - 1, 30)))
        return draw * ceiling


def retry_after_seconds(headers: Iterable[tuple[bytes, bytes]]) -> float | None:
    """The delta-seconds form of ``Retry-After`` (an HTTP date is not honoured: no clock here)."""
    for n, v in headers:
        if n == b"retry-after":
            v = v.strip()
            return float(int(v)) if v.isdigit() and len(v) < 10 else None
    return None


# ------------------------------------------------------------------ outlier detection

@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_5xx: int = 5
    consecutive_gateway: int = 0
    interval: float = 10.0
    base_ejection: float = 30.0
    max_ejection_percent: int = 10

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> "OutlierPolicy | None":
        if spec is None:
            return None
        return cls(
            consecutive_5xx=int(spec.get("consecutive5xxErrors", 5)),
            consecutive_gateway=int(spec.get("consecutiveGatewayErrors", 0)),
            interval=_duration(spec.get("interval"), 10.0),
            base_ejection=_duration(spec.get("baseEjectionTime"), 30.0),
            max_ejection_percent=int(spec.get("maxEjectionPercent", 10)),
        )


NOT_EJECTED = {"ejected": False, "ejections": 0, "consecutive5xx": 0, "consecutiveGatewayErrors": 0}


@dataclass(slots=True)
class _EndpointRecord:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    ejections: int = 0  # the multiplier of baseEjectionTime
    ejected_until: float = 0.0  # 0: not ejected
    ejected_total: int = 0
    healthy_since: float = 0.0


class OutlierTracker:
    """Consecutive errors per endpoint -> ejections. Keys are endpoint keys ``(ip, port)``."""

    __slots__ = ("policy", "records", "ejected", "next_review", "ejections_total", "overflow_total")

    def __init__(self, policy: OutlierPolicy) -> None:
        self.policy = policy
        self.records: dict[tuple, _EndpointRecord] = {}
        self.ejected: set[tuple] = set()
        self.next_review = 0.0  # when ``review`` has work (0: nothing ejected)
        self.ejections_total = 0
        self.overflow_total = 0  # ejections refused by maxEjectionPercent

    def success(self, key: tuple) -> None:
        r = self.records.get(key)
        if r is not None:
            r.consecutive_5xx = r.consecutive_gateway = 0

    def failure(self, key: tuple, status: int, endpoints: int, now: float) -> bool:
        """An answer ``status`` (or 0 for a local failure: connect, reset, timeout) from
        ``key`` out of ``endpoints`` endpoints; True when this ejects it."""
        p = self.policy
        r = self.records.get(key)
        if r is None:
            r = self.records[key] = _EndpointRecord(healthy_since=now)
        if status and status < 500:
            r.consecutive_5xx = r.consecutive_gateway = 0
            return False
        r.consecutive_5xx += 1
        if status in (0, 502, 503, 504):
            r.consecutive_gateway += 1
        else:
            r.consecutive_gateway = 0
        hit = ((p.consecutive_5xx and r.consecutive_5xx >= p.consecutive_5xx)
               or (p.consecutive_gateway and r.consecutive_gateway >= p.consecutive_gateway))
        if not hit or key in self.ejected:
            return False
        r.consecutive_5xx = r.consecutive_gateway = 0
        allowed = max(1, (endpoints * p.max_ejection_percent) // 100)
        if len(self.ejected) >= allowed:
            self.overflow_total += 1
            return False
        r.ejections += 1
        r.ejected_total += 1
        r.ejected_until = now + p.base_ejection * r.ejections
        self.ejected.add(key)
        self.ejections_total += 1
        if not self.next_review or r.ejected_until < self.next_review:
            self.next_review = r.ejected_until
        return True

    def review(self, now: float) -> list[tuple]:
        """The endpoints whose ejection is over (they get traffic again); also lowers the
        ejection count of endpoints that stayed healthy for a whole interval."""
        back = [k for k in self.ejected if self.records[k].ejected_until <= now]
        for k in back:
            self.ejected.discard(k)
            r = self.records[k]
            r.ejected_until = 0.0
            r.healthy_since = now
        interval = self.policy.interval
        for r in self.records.values():
            if r.ejections and not r.ejected_until and now - r.healthy_since >= interval:
                r.ejections -= 1
                r.healthy_since = now
        self.next_review = min((self.records[k].ejected_until for k in self.ejected), default=0.0)
        if not self.next_review and any(r.ejections for r in self.records.values()):
            self.next_review = now + interval
        return back

    def retain(self, keys: set[tuple]) -> None:
        """Forget endpoints that left the Service."""
        for k in [k for k in self.records if k not in keys]:
            del self.records[k]
        self.ejected &= keys

    def describe(self, key: tuple, now: float) -> dict[str, Any]:
        r = self.records.get(key)
        if r is None:
            return dict(NOT_EJECTED)
        out: dict[str, Any] = {"ejected": key in self.ejected, "ejections": r.ejected_total,
                               "consecutive5xx": r.consecutive_5xx, "consecutiveGatewayErrors": r.consecutive_gateway}
        if key in self.ejected:
            out["ejectedForSeconds"] = round(max(0.0, r.ejected_until - now), 3)
        return out


def reinstate(balancer: Any, keys: Iterable[tuple]) -> None:
    """Give the endpoints whose ejection ended (``OutlierTracker.review``) traffic again."""
    keys = set(keys)
    if not keys:
        return
    for ep in balancer.endpoints:
        if (ep.address, ep.port) in keys:
            balancer.set_healthy(ep, True)


# ------------------------------------------------------------------ rate limits

@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    rate: float  # tokens per second
    burst: float
    per_source: bool = False

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None, share: float = 1.0,
                  count: str = "requestsPerUnit") -> "RateLimitPolicy | None":
        """A ``rateLimit`` (``count``: ``connectionsPerUnit`` for a ``connectionRateLimit``);
        ``share``: this process's part of it."""
        if not spec:
            return None
        per_unit = float(spec[count])
        rate = per_unit / _UNITS.get(spec.get("unit", "second"), 1.0)
        burst = float(spec.get("burst") or per_unit)
        return cls(rate * share, max(1.0, burst * share), bool(spec.get("perSourceWorkload", False)))


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one will be there."""
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate


class RateLimiter:
    """The buckets of one ``RateLimitPolicy``: one, or one per source workload (at most
    ``_MAX_SOURCE_BUCKETS``, the oldest dropped). Shared by ``rateLimit`` (requests) and
    ``connlimit`` (``connectionRateLimit``, connections)."""

    __slots__ = ("policy", "_bucket", "_by_source")

    def __init__(self, policy: RateLimitPolicy) -> None:
        self.policy = policy
        self._bucket: TokenBucket | None = None
        self._by_source: dict[str, TokenBucket] = {}

    def take(self, source: str, now: float) -> float:
        """0.0 when a token was taken (``source`` counts only with ``per_source``), else the
        seconds until one will be there."""
        p = self.policy
        if p.per_source:
            b = self._by_source.get(source)
            if b is None:
                if len(self._by_source) >= _MAX_SOURCE_BUCKETS:
                    del self._by_source[next(iter(self._by_source))]
                b = self._by_source[source] = TokenBucket(p.rate, p.burst, now)
        else:
            b = self._bucket
            if b is None:
                b = self._bucket = TokenBucket(p.rate, p.burst, now)
        return b.take(now)

    def sources(self) -> list[str]:
        """The source workloads holding a bucket, oldest first."""
        return list(self._by_source)


def source_key(labels: Any) -> str:
    """The bucket key of ``perSourceWorkload``: the client workload of a connection's labels."""
    return f"{labels.source_workload_namespace}/{labels.source_workload}"


def retry_after_value(wait: float) -> bytes:
    """A ``Retry-After`` for a wait of ``wait`` seconds (whole seconds, at least 1)."""
    return str(max(1, math.ceil(wait))).encode()


# ------------------------------------------------------------------ one destination

@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """The resilience settings of one destination Service (None fields: not configured)."""

    retry: RetryPolicy | None = None
    outlier: OutlierPolicy | None = None
    rate: RateLimitPolicy | None = None
    max_requests: int = 0  # 0: unlimited
    max_retries: int = 0  # 0: only the budget

    @classmethod
    def from_traffic_policy(cls, spec: Mapping[str, Any] | None, share: float = 1.0) -> "DestinationPolicy | None":
        if not spec:
            return None
        cp = spec.get("connectionPool") or {}
        out = cls(RetryPolicy.from_spec(spec.get("retries")), OutlierPolicy.from_spec(spec.get("outlierDetection")),
                  RateLimitPolicy.from_spec(spec.get("rateLimit"), share),
                  _shared(cp.get("maxRequests"), share), _shared(cp.get("maxRetries"), share))
        if out == _NOTHING:
            return None
        return out


_NOTHING = DestinationPolicy()


def _shared(limit: Any, share: float) -> int:
    """This process's part of a node-wide limit (0: none): rounded down, so the processes
    together never exceed it, but at least 1."""
    if not limit:
        return 0
    return max(1, int(int(limit) * share + 1e-9))


class DestinationState:
    """Live counters of one destination (one proxy process); the drivers update them."""

    __slots__ = ("key", "policy", "active", "retries_active", "outlier", "_limiter",
                 "retries_total", "retry_overflow_total", "rate_limited_total", "overflow_total",
                 "faults_aborted_total", "faults_delayed_total")

    def __init__(self, key: tuple, policy: DestinationPolicy) -> None:
        self.key = key
        self.policy = policy
        self.active = 0
        self.retries_active = 0
        self.outlier: OutlierTracker | None = None
        self._limiter: RateLimiter | None = None
        self.retries_total: dict[str, int] = {}
        self.retry_overflow_total = 0
        self.rate_limited_total = 0
        self.overflow_total = 0
        self.faults_aborted_total = 0
        self.faults_delayed_total = 0
        self.update(policy)

    def update(self, policy: DestinationPolicy) -> None:
        """A new snapshot's policy; counters and ejections of an unchanged section survive."""
        old = self.policy
        self.policy = policy
        if policy.outlier is None:
            self.outlier = None
        elif self.outlier is None or old.outlier != policy.outlier:
            prev = self.outlier
            self.outlier = OutlierTracker(policy.outlier)
            if prev is not None:  # keep who is ejected; new thresholds apply from now on
                self.outlier.records, self.outlier.ejected = prev.records, prev.ejected
                self.outlier.next_review = prev.next_review
        if old.rate != policy.rate or self._limiter is None:
            self._limiter = RateLimiter(policy.rate) if policy.rate is not None else None

    # -- circuit breaking
    def admit(self) -> bool:
        """A new request may go (``maxRequests``); counts it in flight when so."""
        m = self.policy.max_requests
        if m and self.active >= m:
            self.overflow_total += 1
            return False
        self.active += 1
        return True

    def request_done(self) -> None:
        self.active -= 1

    # -- retries
    def may_retry(self) -> bool:
        """The budget and ``maxRetries`` allow one more retry in flight (then counted)."""
        p = self.policy
        r = p.retry
        allowed = max(r.min_concurrency, int(self.active * r.budget_percent / 100.0)) if r else 0
        if p.max_retries:
            allowed = min(allowed, p.max_retries)
        if self.retries_active >= allowed:
            self.retry_overflow_total += 1
            return False
        self.retries_active += 1
        return True

    def retry_done(self) -> None:
        self.retries_active -= 1

    def count_retry(self, reason: str) -> None:
        self.retries_total[reason] = self.retries_total.get(reason, 0) + 1

    # -- rate limits
    def rate_limit(self, source: str, now: float) -> float:
        """0.0: the request may go; else the seconds until it could (answer 429)."""
        limiter = self._limiter
        if limiter is None:
            return 0.0
        wait = limiter.take(source, now)
        if wait:
            self.rate_limited_total += 1
        return wait

    # -- outlier detection
    def observe(self, ep_key: tuple, status: int, endpoints: int, now: float) -> bool:
        """The outcome of one try at ``ep_key``: an HTTP status, or 0 for a local failure.
        True when it ejected the endpoint (the driver marks it unhealthy in the balancer)."""
        o = self.outlier
        if o is None:
            return False
        if status and status < 500:
            o.success(ep_key)
            return False
        return o.failure(ep_key, status, endpoints, now)

    def describe(self) -> dict[str, Any]:
        p = self.policy
        out: dict[str, Any] = {"requestsActive": self.active, "retriesActive": self.retries_active,
                               "retries": dict(self.retries_total), "retryOverflow": self.retry_overflow_total,
                               "rateLimited": self.rate_limited_total, "overflow": self.overflow_total,
                               "faultsAborted": self.faults_aborted_total, "faultsDelayed": self.faults_delayed_total}
        if p.max_requests:
            out["maxRequests"] = p.max_requests
        if p.retry is not None:
            out["retry"] = {"attempts": p.retry.attempts, "retryOn": sorted(p.retry.retry_on),
                            "perTryTimeout": p.retry.per_try_timeout or None,
                            "budgetPercent": p.retry.budget_percent, "minRetryConcurrency": p.retry.min_concurrency}
        if self.outlier is not None:
            out["outlier"] = {"ejected": len(self.outlier.ejected), "ejectionsTotal": self.outlier.ejections_total,
                              "overflow": self.outlier.overflow_total}
        if p.rate is not None:
            out["rateLimit"] = {"tokensPerSecond": p.rate.rate, "burst": p.rate.burst,
                                "perSourceWorkload": p.rate.per_source}
        return out


class ResilienceState:
    """The ``DestinationState`` of every destination with a policy, kept across snapshots."""

    __slots__ = ("_by_key",)

    def __init__(self) -> None:
        self._by_key: dict[tuple, DestinationState] = {}

    def get(self, key: tuple, policy: DestinationPolicy) -> DestinationState:
        st = self._by_key.get(key)
        if st is None:
            st = self._by_key[key] = DestinationState(key, policy)
        elif st.policy is not policy:
            st.update(policy)
        return st

    def peek(self, key: tuple) -> DestinationState | None:
        return self._by_key.get(key)

    def retain(self, keys: Iterable[tuple]) -> None:
        keep = set(keys)
        for k in [k for k, st in self._by_key.items() if k not in keep and not st.active]:
            del self._by_key[k]

    def items(self):
        return self._by_key.items()


# ------------------------------------------------------------------ fault injection

@dataclass(frozen=True, slots=True)
class FaultDecision:
    delay: float = 0.0
    abort_status: int = 0  # HTTP status (0: none)
    abort_grpc: int = -1  # gRPC status (-1: none)

    @property
    def aborts(self) -> bool:
        return bool(self.abort_status) or self.abort_grpc >= 0


NO_FAULT = FaultDecision()


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    """A FaultInjection: ``delay`` then ``abort``, each for its percentage of the matching
    requests (all ``headers`` present with exactly these values)."""

    delay: float = 0.0
    delay_fraction: float = 0.0
    abort_status: int = 0
    abort_grpc: int = -1
    abort_fraction: float = 0.0
    headers: tuple[tuple[bytes, bytes], ...] = field(default=())
    name: str = ""

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], name: str = "") -> "FaultPolicy":
        d = spec.get("delay") or {}
        a = spec.get("abort") or {}
        return cls(
            delay=_duration(d.get("fixedDelay"), 0.0) if d else 0.0,
            delay_fraction=float(d.get("percentage", 0)) / 100.0 if d else 0.0,
            abort_status=int(a.get("httpStatus") or 0) if a else 0,
            abort_grpc=int(a["grpcStatus"]) if a and a.get("grpcStatus") is not None else -1,
            abort_fraction=float(a.get("percentage", 0)) / 100.0 if a else 0.0,
            headers=tuple((str(h["name"]).lower().encode(), str(h["value"]).encode())
                          for h in spec.get("headers") or ()),
            name=name,
        )

    def matches(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        if not self.headers:
            return True
        have = {}
        for n, v in headers:
            have.setdefault(n, v)
        return all(have.get(n) == v for n, v in self.headers)

    def decide(self, headers: Iterable[tuple[bytes, bytes]], delay_draw: float, abort_draw: float) -> FaultDecision:
        """Draws are uniform in [0, 1); a percentage of 100 always fires, 0 never."""
        if not self.matches(headers):
            return NO_FAULT
        delay = self.delay if self.delay and delay_draw < self.delay_fraction else 0.0
        aborts = (self.abort_status or self.abort_grpc >= 0) and abort_draw < self.abort_fraction
        if not delay and not aborts:
            return NO_FAULT
        if not aborts:
            return FaultDecision(delay=delay)
        return FaultDecision(delay, self.abort_status, self.abort_grpc)


# ------------------------------------------------------------------ views (/clusters)

def state_view(state: ResilienceState, now: float) -> dict[str, dict]:
    """JSON-able live state: ``"ns/name/port"`` -> ``{"summary": DestinationState.describe(),
    "endpoints": {"ip:port": OutlierTracker.describe()}}`` (only endpoints it has records of)."""
    out = {}
    for (ns, name, port), st in list(state.items()):
        eps = {}
        if st.outlier is not None:
            eps = {f"{k[0]}:{k[1]}": st.outlier.describe(k, now) for k in list(st.outlier.records)}
        out[f"{ns}/{name}/{port}"] = {"summary": st.describe(), "endpoints": eps}
    return out


# summary fields that are counts (summed over processes) and per-process shares of a
# node-wide limit (summed back); every other field is a setting, the same in each process
_SUMMED = frozenset({"requestsActive", "retriesActive", "retryOverflow", "rateLimited", "overflow",
                     "faultsAborted", "faultsDelayed", "maxRequests", "ejected", "ejectionsTotal",
                     "tokensPerSecond", "burst", "ejections"})


def _add(a: Any, b: Any, key: str = "") -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        counts = key == "retries"  # reason -> retries
        return {k: (_add(a[k], b[k], "" if counts else k) if not counts else a[k] + b[k]) if k in a and k in b
                else a.get(k, b.get(k)) for k in {**a, **b}}
    if isinstance(a, bool) or isinstance(b, bool):
        return a or b
    if key in _SUMMED and isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a + b
    if key in ("consecutive5xx", "consecutiveGatewayErrors") and isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    return a


def merge_state_views(views: Iterable[dict[str, dict]]) -> dict[str, dict]:
    """One view of several worker processes' ``state_view``: counters summed, an endpoint
    ejected when a process ejected it (``ejectedForSeconds``: the longest), settings as one."""
    merged: dict[str, dict] = {}
    for view in views:
        for key, v in view.items():
            m = merged.get(key)
            if m is None:
                merged[key] = {"summary": dict(v["summary"]), "endpoints": {e: dict(d) for e, d in v["endpoints"].items()}}
                continue
            m["summary"] = _add(m["summary"], v["summary"])
            for ep, d in v["endpoints"].items():
                have = m["endpoints"].get(ep)
                if have is None:
                    m["endpoints"][ep] = dict(d)
                    continue
                longest = max(have.get("ejectedForSeconds", 0.0), d.get("ejectedForSeconds", 0.0))
                have.update(_add(have, d))
                if have["ejected"]:
                    have["ejectedForSeconds"] = longest
    return merged
