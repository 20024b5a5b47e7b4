"""Access logs: one JSON line per HTTP request and per relayed TCP connection.

Config (``controlplane/model/kinds.py``): MeshConfig ``spec.accessLog`` {``output``:
``stdout`` or an absolute file path, ``samplingPercentage``} turns logging on and says where
the lines go; ``Telemetry`` objects set ``accessLogging`` {``disabled``,
``samplingPercentage``} for a narrower scope. The most specific scope decides, whole:

1. a Telemetry whose ``targetRef`` is the HTTPRoute/GRPCRoute that routed the request;
2. one whose ``targetRef`` is the destination Service (requests and TCP connections);
3. the workload's: a Telemetry in its namespace whose ``selector`` matches its labels
   (several: the first by namespace/name), else its namespace's Telemetry without a
   selector, else the mesh-wide one (no selector, in the MeshConfig's namespace). The
   workload is the *source* on the outbound listener (``reporter: source``) and the
   *destination* on the inbound listener (``reporter: destination``), as a sidecar's
   Telemetry applies to its own proxy's traffic;
4. the MeshConfig's ``samplingPercentage``.

The pieces, each usable alone:

* ``AccessLogPolicy`` — those decisions, compiled once per snapshot (no I/O).
* ``LineFormat`` — a record to one JSON line (Envoy/Istio field names, below). Values are
  bounded (path 1024 characters, authority and user agent 256, ...) and JSON-escaped
  (``ensure_ascii``: no raw control characters, so a header can never start a new line),
  so a line stays below ``PIPE_BUF`` (4096) where possible: see ``LogWriter``.
* ``LogWriter`` — a bounded queue (``capacity`` lines) drained by a daemon thread that
  writes batches: a regular file (opened ``O_APPEND``) gets one ``write()`` per batch, a
  pipe or socket (stdout) one ``write()`` per run of whole lines below ``PIPE_BUF``, so lines
  of several worker processes sharing a stdout never interleave. The event loop only
  appends to the queue: a full queue drops the line (``dropped{reason="queue_full"}``), a
  writer stalled on a full pipe or a hung disk never stalls the loop. Files are reopened
  when the output changes and when the path no longer names the open file (checked every
  second: logrotate ``create`` mode; ``copytruncate`` works as is, thanks to O_APPEND).
* ``AccessLog`` — the event loop's side: follows the snapshot (``AgentState.subscribe``),
  samples, formats, queues, and exposes ``hostmesh_agent_access_log_written_total`` and
  ``hostmesh_agent_access_log_dropped_total{reason}`` on the registry it is given. With
  worker processes each process has its own (its own thread and file descriptor), and the
  agent merges the counters (``worker_wire``).

Cost when off: ``AccessLog.attach(holder)`` sets ``holder.access_log`` to the log while the
snapshot asks for any line, else to None; the drivers and the relay test that attribute
(one load and an ``is None``) and do nothing else. ``holder``: a ``ProxyListener`` (TCP lines,
``relay.Relay``) and an ``L7Inputs`` (the HTTP drivers).

Line fields (``null`` where a value does not apply, e.g. ``method`` of a TCP line):
``start_time`` (RFC 3339, ms, UTC), ``duration`` (ms), ``protocol`` (``HTTP/1.1``,
``HTTP/2``; null for TCP), ``method``, ``authority``, ``path`` (as the client sent them),
``response_code`` (0: none sent), ``response_flags`` (``-`` or Envoy's flag),
``bytes_received``/``bytes_sent`` (HTTP: body bytes from/to the client; TCP: bytes),
``upstream_host`` (the endpoint dialed), ``upstream_cluster`` (the destination Service's
hostname), ``downstream_remote_address``, ``downstream_local_address`` (the original
destination; HTTP), ``route_name`` (``HTTPRoute/ns/name#rule``), ``request_id``
(``x-request-id`` as forwarded), ``trace_id`` (from ``traceparent``, else ``x-b3-traceid``),
``user_agent``, then the connection's metric labels: ``reporter``, ``node``,
``request_protocol``, ``connection_security_policy``, ``source_workload``,
``source_namespace``, ``source_principal``, ``destination_service``,
``destination_workload``, ``destination_namespace``, ``destination_principal``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random as _random
import stat
import threading
import time
from json.encoder import encode_basestring_ascii as _quote
from time import perf_counter as _clock
from typing import Any, Callable, Iterable

from prometheus_client.core import CounterMetricFamily

from nodeagent.state import AgentState, NodeSnapshot
from nodeagent.telemetry import UNKNOWN

log = logging.getLogger(__name__)

STDOUT = "stdout"
PIPE_BUF = 4096  # POSIX: a write of at most this many bytes to a pipe is atomic
DEFAULT_CAPACITY = 16384  # lines queued before new ones are dropped
MAX_BATCH = 4096  # lines per write batch
REOPEN_CHECK = 1.0  # seconds between checks that a file output's path still names the open file
IDLE_WAKE = 1.0  # the writer thread wakes this often when idle (rotation checks)
FILE_MODE = 0o640

MAX_PATH = 1024
MAX_AUTHORITY = 256
MAX_USER_AGENT = 256
MAX_REQUEST_ID = 128
_SHORT = 96  # the bound of those fields when a line still exceeds PIPE_BUF

REPORTER_SOURCE = "source"
_HEX = frozenset(b"0123456789abcdefABCDEF")


# ---------------------------------------------------------------------- decisions

def _percent(section: Any) -> float:
    """A Telemetry accessLogging section -> the percentage of lines it keeps."""
    if not isinstance(section, dict) or section.get("disabled"):
        return 0.0
    try:
        return min(100.0, max(0.0, float(section.get("samplingPercentage", 100))))
    except (TypeError, ValueError):
        return 0.0


class AccessLogPolicy:
    """Which requests and connections are logged, compiled from one snapshot (see the module
    doc for the precedence). ``percent(labels, route)``: the share (0-100) logged of those
    with these metric labels, routed by ``route`` (a ``routing.RouteRef`` or None)."""

    __slots__ = ("output", "mesh", "routes", "services", "workloads", "scoped")

    def __init__(self, output: str, mesh: float, *, routes: dict | None = None, services: dict | None = None,
                 workloads: dict | None = None) -> None:
        self.output = output
        self.mesh = mesh
        self.routes: dict[tuple[str, str, str], float] = routes or {}
        self.services: dict[tuple[str, str], float] = services or {}
        self.workloads: dict[tuple[str, str], float] = workloads or {}
        self.scoped = bool(self.routes or self.services or self.workloads)

    @property
    def logs_anything(self) -> bool:
        return self.mesh > 0 or any(p > 0 for d in (self.routes, self.services, self.workloads) for p in d.values())

    @classmethod
    def from_snapshot(cls, snapshot: NodeSnapshot | None) -> "AccessLogPolicy | None":
        """None when the snapshot's MeshConfig has no ``accessLog`` (no access logs)."""
        if snapshot is None:
            return None
        sink: Any = None
        root = ""
        telemetries: list[tuple[str, str, dict]] = []
        for c in snapshot.config:
            if c.kind == "MeshConfig":
                root = c.namespace
                sink = _spec(c.spec).get("accessLog")
            elif c.kind == "Telemetry":
                spec = _spec(c.spec)
                if "accessLogging" in spec:
                    telemetries.append((c.namespace, c.name, spec))
        if not isinstance(sink, dict) or not isinstance(sink.get("output"), str):
            return None
        output = sink["output"]
        if output == "/dev/stdout":  # as Istio's accessLogFile; opening it fails on a socket (journald)
            output = STDOUT
        mesh = _percent({"samplingPercentage": sink.get("samplingPercentage", 100)})
        routes: dict[tuple[str, str, str], float] = {}
        services: dict[tuple[str, str], float] = {}
        namespaces: dict[str, float] = {}
        selectors: list[tuple[str, dict, float]] = []
        for ns, _name, spec in sorted(telemetries, key=lambda t: (t[0], t[1])):
            pct = _percent(spec["accessLogging"])
            ref = spec.get("targetRef")
            selector = spec.get("selector")
            if isinstance(ref, dict):
                kind, target = ref.get("kind", "Service"), ref.get("name", "")
                if kind == "Service":
                    services.setdefault((ns, target), pct)
                else:
                    routes.setdefault((kind, ns, target), pct)
            elif isinstance(selector, dict):
                selectors.append((ns, dict(selector.get("matchLabels") or {}), pct))
            else:
                namespaces.setdefault(ns, pct)
        if root in namespaces:  # the mesh-wide Telemetry: also for sources the mesh does not know
            mesh = namespaces[root]
        workloads: dict[tuple[str, str], float] = {}
        if selectors or namespaces:
            for w in snapshot.workloads:
                labels = dict(w.labels)
                pct = next((p for ns, match, p in selectors
                            if ns == w.namespace and all(labels.get(k) == v for k, v in match.items())), None)
                if pct is None:
                    pct = namespaces.get(w.namespace)
                if pct is not None:
                    workloads[(w.namespace, w.name)] = pct
        return cls(output, mesh, routes=routes, services=services, workloads=workloads)

    def percent(self, labels, route=None) -> float:
        if not self.scoped:
            return self.mesh
        if route is not None and self.routes:
            p = self.routes.get((route.kind, route.namespace, route.name))
            if p is not None:
                return p
        if self.services:
            p = self.services.get((labels.destination_service_namespace, labels.destination_service_name))
            if p is not None:
                return p
        if self.workloads:
            if labels.reporter == REPORTER_SOURCE:
                p = self.workloads.get((labels.source_workload_namespace, labels.source_workload))
            else:
                p = self.workloads.get((labels.destination_workload_namespace, labels.destination_workload))
            if p is not None:
                return p
        return self.mesh


def _spec(text: str) -> dict:
    try:
        spec = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


class Sampler:
    """Keeps ``percent`` % of what it is asked about: one draw per question, none at 0 or 100."""

    __slots__ = ("draw",)

    def __init__(self, draw: Callable[[], float] | None = None) -> None:
        self.draw = draw or _random.Random().random

    def __call__(self, percent: float) -> bool:
        if percent >= 100.0:
            return True
        return percent > 0.0 and self.draw() * 100.0 < percent


# ---------------------------------------------------------------------- lines

def _text(value: bytes | str | None, limit: int) -> str:
    """A JSON string (quoted, escaped) of at most ``limit`` characters, or null."""
    if value is None:
        return "null"
    if type(value) is not str:
        value = value.decode("latin-1")
    if len(value) > limit:
        value = value[:limit]
    return _quote(value)


class LineFormat:
    """Records to JSON lines (one event loop owns an instance: its memos are not locked)."""

    __slots__ = ("node", "_labels", "_second", "_stamp")

    def __init__(self, node: str) -> None:
        self.node = node
        self._labels: dict = {}  # connection labels -> their JSON tail (computed once per label set)
        self._second = -1
        self._stamp = ""

    def start_time(self, t: float) -> str:
        second = int(t)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f'"{self._stamp}.{int((t - second) * 1000):03d}Z"'

    def labels_tail(self, labels) -> str:
        tail = self._labels.get(labels)
        if tail is None:
            svc = labels.destination_service
            tail = (f'"upstream_cluster":{"null" if svc == UNKNOWN else _quote(svc)},'
                    f'"reporter":{_quote(labels.reporter)},"node":{_quote(self.node)},'
                    f'"request_protocol":{_quote(labels.request_protocol)},'
                    f'"connection_security_policy":{_quote(labels.connection_security_policy)},'
                    f'"source_workload":{_quote(labels.source_workload)},'
                    f'"source_namespace":{_quote(labels.source_workload_namespace)},'
                    f'"source_principal":{_quote(labels.source_principal)},'
                    f'"destination_service":{_quote(svc)},'
                    f'"destination_workload":{_quote(labels.destination_workload)},'
                    f'"destination_namespace":{_quote(labels.destination_workload_namespace)},'
                    f'"destination_principal":{_quote(labels.destination_principal)}}}\n')
            if len(self._labels) >= 4096:  # label sets come from config: bounded anyway
                self._labels.clear()
            self._labels[labels] = tail
        return tail

    def line(self, labels, *, start: float, duration: float, protocol: str | None, method, authority, path,
             code: int, flags: str, received: int, sent: int, upstream: str | None, remote: str | None,
             local: str | None = None, route: str | None = None, request_id=None, trace_id: str | None = None,
             user_agent=None) -> str:
        """One line (``start``: wall-clock seconds, ``duration``: seconds; bytes and str values
        are escaped and bounded here)."""
        text = self._line(labels, start, duration, protocol, method, authority, path, code, flags, received, sent,
                          upstream, remote, local, route, request_id, trace_id, user_agent, MAX_PATH, MAX_AUTHORITY,
                          MAX_USER_AGENT)
        if len(text) >= PIPE_BUF:  # escaped non-ASCII can grow a field six-fold: shorten the client's fields
            text = self._line(labels, start, duration, protocol, method, authority, path, code, flags, received,
                              sent, upstream, remote, local, route, request_id, trace_id, user_agent, _SHORT, _SHORT,
                              _SHORT)
        return text

    def _line(self, labels, start, duration, protocol, method, authority, path, code, flags, received, sent,
              upstream, remote, local, route, request_id, trace_id, user_agent, max_path, max_authority,
              max_user_agent) -> str:
        return (f'{{"start_time":{self.start_time(start)},"duration":{int(duration * 1000)},'
                f'"protocol":{"null" if protocol is None else _quote(protocol)},'
                f'"method":{_text(method, 32)},"authority":{_text(authority, max_authority)},'
                f'"path":{_text(path, max_path)},"response_code":{code},"response_flags":{_quote(flags)},'
                f'"bytes_received":{received},"bytes_sent":{sent},'
                f'"upstream_host":{_text(upstream, 64)},"downstream_remote_address":{_text(remote, 64)},'
                f'"downstream_local_address":{_text(local, 64)},"route_name":{_text(route, 512)},'
                f'"request_id":{_text(request_id, MAX_REQUEST_ID)},'
                f'"trace_id":{"null" if trace_id is None else _quote(trace_id)},'
                f'"user_agent":{_text(user_agent, max_user_agent)},' + self.labels_tail(labels))


def trace_id_of(traceparent: bytes | None, b3: bytes | None) -> str | None:
    """The trace id of a W3C ``traceparent`` (``00-<32 hex>-<16 hex>-<2 hex>``), else of
    ``x-b3-traceid`` (16 or 32 hex); None when neither is well formed."""
    if traceparent is not None:
        parts = traceparent.strip().split(b"-")
        if len(parts) >= 4 and len(parts[1]) == 32 and set(parts[1]) <= _HEX and parts[1].strip(b"0"):
            return parts[1].decode("ascii").lower()
    if b3 is not None:
        v = b3.strip()
        if len(v) in (16, 32) and set(v) <= _HEX:
            return v.decode("ascii").lower()
    return None


def request_fields(headers: Iterable[tuple[bytes, bytes]]) -> tuple:
    """(host, user-agent, x-request-id, traceparent, x-b3-traceid) of a request's fields."""
    host = ua = rid = tp = b3 = None
    for n, v in headers:
        if n == b"host":
            host = v
        elif n == b"user-agent":
            ua = v
        elif n == b"x-request-id":
            rid = v
        elif n == b"traceparent":
            tp = v
        elif n == b"x-b3-traceid":
            b3 = v
    return host, ua, rid, tp, b3


def _forwarded_request_id(up_head) -> bytes | None:
    """The x-request-id the upstream got (the proxy keeps the client's or adds one: the last field)."""
    if up_head is None:
        return None
    for n, v in reversed(up_head.headers):
        if n == b"x-request-id":
            return v
    return None


def _address(addr) -> str | None:
    if not addr:
        return None
    try:
        return f"{addr[0]}:{addr[1]}"
    except (IndexError, TypeError):
        return None


# ---------------------------------------------------------------------- the writer

def open_output(output: str) -> int:
    """A file descriptor for ``output``: a duplicate of stdout, or the file opened for appending."""
    if output == STDOUT:
        fd = os.dup(1)
        os.set_inheritable(fd, False)
        return fd
    return os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY, FILE_MODE)


class LogWriter:
    """A bounded queue of lines and the daemon thread that writes them (see the module doc).

    ``put`` and the counters' reads run on the event loop; everything else on the thread,
    started with the first line. ``output`` (None: lines are dropped as write errors) may be
    changed at any time; the thread reopens at its next batch. ``open_output``: output ->
    file descriptor (tests pass pipes)."""

    def __init__(self, *, capacity: int = DEFAULT_CAPACITY, open_output: Callable[[str], int] = open_output,
                 reopen_check: float = REOPEN_CHECK) -> None:
        if capacity < 1:
            raise ValueError(f"LogWriter.capacity: must be >= 1, got {capacity!r}")
        self.capacity = capacity
        self.output: str | None = None
        self.open_output = open_output
        self.reopen_check = reopen_check
        self.written = 0  # lines written (the thread)
        self.dropped_full = 0  # lines dropped because the queue was full (the loop)
        self.dropped_error = 0  # lines lost to an output that could not be opened or written (the thread)
        self._queue: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._signalled = False
        self._done = threading.Condition()
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._fd = -1
        self._fd_output: str | None = None
        self._pipe_like = True
        self._ident: tuple[int, int] | None = None
        self._checked = 0.0
        self._retry_at = 0.0
        self._failure: str | None = None  # the last error logged (logged again only after a success)

    # ----------------------------------------------------------------- the loop's side
    def put(self, line: str) -> None:
        """Queue one line (never blocks); counted as dropped when the queue is full."""
        q = self._queue
        if len(q) >= self.capacity:
            self.dropped_full += 1
            return
        q.append(line)
        if not self._signalled:  # the first line since the thread last looked: wake it
            self._signalled = True
            if self._thread is None:
                self._start()
            self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def started(self) -> bool:
        """Whether a line was ever queued (the thread runs): only then is there anything to flush."""
        return self._thread is not None

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every queued line is written (or given up);
        True when the queue is empty. Blocks the caller: run it off the loop (``asyncio.to_thread``)."""
        if self._thread is None:
            return not self._queue
        self._wake.set()
        with self._done:
            return self._done.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float = 1.0) -> None:
        """Flush (bounded), stop the thread and close the output."""
        thread = self._thread
        if thread is None:
            return
        self.flush(timeout)
        self._stopping = True
        self._wake.set()
        thread.join(timeout)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hostmesh-access-log", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            while True:
                self._wake.wait(IDLE_WAKE)
                self._wake.clear()
                self._signalled = False
                with self._done:
                    self._busy = True
                try:
                    self._drain()
                except Exception:  # never let the thread die: lines would pile up, then drop
                    log.exception("access log: the writer failed")
                finally:
                    with self._done:
                        self._busy = False
                        self._done.notify_all()
                if self._stopping and not self._queue:
                    break
        finally:
            self._close_fd()

    def _drain(self) -> None:
        q = self._queue
        while q:
            batch: list[str] = []
            try:
                while len(batch) < MAX_BATCH:
                    batch.append(q.popleft())
            except IndexError:
                pass
            self._write(batch)
        if self._fd >= 0 and self._fd_output not in (None, STDOUT):
            self._check_rotation()

    def _write(self, batch: list[str]) -> None:
        output = self.output
        if output != self._fd_output or self._fd < 0:
            self._reopen(output)
        if self._fd < 0:
            self.dropped_error += len(batch)
            return
        if self._pipe_like:
            chunks = _pipe_chunks(batch)
        else:
            chunks = [(len(batch), "".join(batch).encode("ascii", "replace"))]
        for i, (lines, data) in enumerate(chunks):
            try:
                _write_all(self._fd, data)
            except OSError as exc:
                lost = sum(n for n, _ in chunks[i:])
                self.dropped_error += lost
                self._failed(f"cannot write to {self._fd_output}: {exc.strerror or exc}", lost)
                self._close_fd()  # reopened at the next batch (a file), or the dup of stdout again
                return
            self.written += lines
        self._failure = None

    def _reopen(self, output: str | None) -> None:
        self._close_fd()
        self._fd_output = output
        if output is None:
            return
        now = time.monotonic()
        if now < self._retry_at:
            return
        try:
            fd = self.open_output(output)
            st = os.fstat(fd)
        except OSError as exc:
            self._retry_at = now + 1.0  # one attempt a second while it fails
            self._failed(f"cannot open {output}: {exc.strerror or exc}", 0)
            return
        self._fd = fd
        self._pipe_like = not stat.S_ISREG(st.st_mode)
        self._ident = (st.st_dev, st.st_ino)
        self._checked = now
        log.info("access log: writing to %s", output)

    def _check_rotation(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reopen_check:
            return
        self._checked = now
        try:
            st = os.stat(self._fd_output)
            same = (st.st_dev, st.st_ino) == self._ident
        except OSError:
            same = False
        if not same:  # rotated (renamed or removed): the next batch opens the path afresh
            log.info("access log: %s was rotated; reopening", self._fd_output)
            self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def _failed(self, message: str, lost: int) -> None:
        if message != self._failure:
            self._failure = message
            log.warning("access log: %s (lines are dropped and counted until it works)", message,
                        extra={"lines_lost": lost})


def _pipe_chunks(batch: list[str]) -> list[tuple[int, bytes]]:
    """Runs of whole lines of at most PIPE_BUF bytes (a longer line alone): atomic pipe writes."""
    out: list[tuple[int, bytes]] = []
    run: list[str] = []
    size = 0
    for line in batch:
        n = len(line)  # ASCII: characters are bytes
        if run and size + n > PIPE_BUF:
            out.append((len(run), "".join(run).encode("ascii", "replace")))
            run, size = [], 0
        run.append(line)
        size += n
    if run:
        out.append((len(run), "".join(run).encode("ascii", "replace")))
    return out


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# ---------------------------------------------------------------------- the loop's side

class AccessLog:
    """The event loop's access log: follows the snapshot, decides, formats and queues lines.

    ``registry``: where the counters are exposed (a collector, like ``HttpMetrics``).
    ``state``: its snapshots decide (``AccessLogPolicy``). ``draw``: uniform draws in [0, 1)
    for sampling (tests pass a seeded one). ``writer``: a ``LogWriter`` (tests pass one with
    a pipe). ``clock``: wall-clock seconds for ``start_time``."""

    def __init__(self, registry, state: AgentState, *, node: str, draw: Callable[[], float] | None = None,
                 writer: LogWriter | None = None, clock: Callable[[], float] = time.time) -> None:
        self.node = node
        self.policy: AccessLogPolicy | None = None
        self.format = LineFormat(node)
        self.writer = writer if writer is not None else LogWriter()
        self.sample = Sampler(draw)
        self.clock = clock
        self._holders: list[Any] = []
        if registry is not None:
            registry.register(self)
        state.subscribe(self.apply)
        self.apply(state.snapshot)

    # ----------------------------------------------------------------- config
    def attach(self, holder: Any) -> None:
        """Keep ``holder.access_log`` at this log while anything is logged, None otherwise."""
        self._holders.append(holder)
        holder.access_log = self if self.policy is not None else None

    def apply(self, snapshot: NodeSnapshot | None) -> None:
        """An AgentState subscriber: compile the snapshot's policy, switch the holders."""
        try:
            policy = AccessLogPolicy.from_snapshot(snapshot)
        except Exception:  # the control plane validated it: a bug here must not fail the apply
            log.exception("access log: cannot read the snapshot's access log config; access logs are off")
            policy = None
        if policy is not None and not policy.logs_anything:
            policy = None
        if (policy is None) != (self.policy is None) or (policy is not None and policy.output != self.policy.output):
            log.info("access log: %s", f"on, to {policy.output}" if policy is not None else "off")
        self.policy = policy
        if policy is not None:
            self.writer.output = policy.output
        on = self if policy is not None else None
        for holder in self._holders:
            holder.access_log = on

    # ----------------------------------------------------------------- records
    def http1(self, ex, status: int, flag: str) -> None:
        """An HTTP/1 exchange finished (``http1_proxy._Exchange``)."""
        policy = self.policy
        if policy is None:
            return
        d = ex.decision
        route = d.route if d is not None else None
        labels = ex.labels
        if not self.sample(policy.percent(labels, route)):
            return
        head = ex.head
        host, ua, rid, tp, b3 = request_fields(head.headers)
        ctx = ex.down.ctx
        self._http(labels, ex, ctx, route, status, flag, b"HTTP/" + head.version, head.method, host, head.target,
                   _forwarded_request_id(ex.up_head) or rid, trace_id_of(tp, b3), ua)

    def http2(self, st, status: int, flag: str) -> None:
        """An HTTP/2 stream finished (``http2_proxy._Stream``)."""
        policy = self.policy
        if policy is None:
            return
        d = st.decision
        route = d.route if d is not None else None
        labels = st.labels
        if not self.sample(policy.percent(labels, route)):
            return
        head = st.head
        _host, ua, rid, tp, b3 = request_fields(head.headers)
        self._http(labels, st, st.down.ctx, route, status, flag, b"HTTP/2", head.method, head.authority, head.path,
                   _forwarded_request_id(st.up_head) or rid, trace_id_of(tp, b3), ua)

    def _http(self, labels, x, ctx, route, status, flag, protocol, method, authority, path, rid, trace, ua) -> None:
        now = self.clock()
        took = max(0.0, _clock() - x.started)
        ep = x.endpoint
        fmt = self.format
        self.writer.put(fmt.line(
            labels, start=now - took, duration=took, protocol=protocol.decode("ascii", "replace"), method=method,
            authority=authority if authority is not None else f"{ctx.dst_ip}:{ctx.dst_port}", path=path,
            code=status, flags=flag, received=x.req_bytes, sent=x.resp_bytes,
            upstream=f"{ep.address}:{ep.port}" if ep is not None else None, remote=ctx.src_ip,
            local=f"{ctx.dst_ip}:{ctx.dst_port}", route=str(route) if route is not None else None, request_id=rid,
            trace_id=trace, user_agent=ua))

    def http_error(self, ctx, status: int, flag: str, protocol: str) -> None:
        """A request the codec refused before it became one (a bad head: 400/431 DPE, ...)."""
        policy = self.policy
        labels = ctx.labels
        if policy is None or not self.sample(policy.percent(labels, None)):
            return
        if protocol == "HTTP/2":
            labels = labels._replace(request_protocol="http2")
        self.writer.put(self.format.line(
            labels, start=self.clock(), duration=0.0, protocol=protocol, method=None, authority=None, path=None,
            code=status, flags=flag, received=0, sent=0, upstream=None, remote=ctx.src_ip,
            local=f"{ctx.dst_ip}:{ctx.dst_port}"))

    def tcp_opened(self, transport, upstream: tuple[str, int] | None) -> tuple:
        """What a relayed connection keeps for its line (``Relay.alog``): start times, the
        upstream address, the client's address."""
        try:
            peer = _address(transport.get_extra_info("peername"))
        except Exception:
            peer = None
        return self.clock(), _clock(), _address(upstream), peer

    def tcp(self, relay) -> None:
        """A relayed connection closed (``relay.Relay``, with ``alog`` from ``tcp_opened``)."""
        policy = self.policy
        labels = relay.labels
        if policy is None or labels is None or not self.sample(policy.percent(labels, None)):
            return
        start, t0, upstream, peer = relay.alog
        up = relay.up
        self.writer.put(self.format.line(
            labels, start=start, duration=max(0.0, _clock() - t0), protocol=None, method=None, authority=None,
            path=None, code=0, flags=relay.flags, received=relay.nbytes, sent=up.nbytes if up is not None else 0,
            upstream=upstream, remote=peer))

    # ----------------------------------------------------------------- lifecycle, metrics
    def flush(self, timeout: float) -> bool:
        return self.writer.flush(timeout)

    @property
    def writing(self) -> bool:
        return self.writer.started

    def describe(self):
        return self.collect()

    def collect(self):
        w = self.writer
        written = CounterMetricFamily("hostmesh_agent_access_log_written",
                                      "Access log lines written (by this process, or summed over the workers).",
                                      value=w.written)
        dropped = CounterMetricFamily("hostmesh_agent_access_log_dropped",
                                      "Access log lines dropped: queue_full (the writer fell behind; the event "
                                      "loop never waits for it), write_error (the output could not be opened or "
                                      "written).", labels=("reason",))
        dropped.add_metric(["queue_full"], w.dropped_full)
        dropped.add_metric(["write_error"], w.dropped_error)
        return [written, dropped]
