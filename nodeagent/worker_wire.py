"""What the agent and its proxy worker processes say to each other, and how worker
metrics become one exposition. No sockets here (framing works on any blocking socket).

One stream socketpair per worker. Each message is a 4-byte big-endian length and a JSON
object with a ``type``. The agent sends; the worker answers only requests (those with an
``id``) and its one ``ready``:

    agent -> worker   init        bootstrap, worker index, listener fds by name
                      snapshot    NodeSnapshot.to_dict()
                      identities  trust domain + CertificateManager.held_files()
                      jwks        uri + body (latin-1 text of the bytes), or body null: forget
                      start       start accepting on the listener fds
                      stop_accepting
                      drain       grace: stop accepting, drain, then exit
                      metrics/stats/describe/resilience (requests, with id)
    worker -> agent   ready       pid
                      reply       id + the answer

Metrics: each worker has its own registry; ``families`` turns a registry into plain data
and ``merge`` sums the workers' samples per (name, labels), so the agent's /metrics shows
one node proxy. Counters and histograms of workers that died are kept (``Retired``) so
the node's totals never go backwards when a worker is restarted. ``_created`` samples
are dropped: per-process start times do not add up.
"""

from __future__ import annotations

import json
import math
import socket
import struct
from typing import Iterable

from prometheus_client.core import Metric

from nodeagent.errors import AgentError

MAX_MESSAGE = 256 * 1024 * 1024  # a snapshot of a very large mesh still fits
_LEN = struct.Struct(">I")
CUMULATIVE_TYPES = ("counter", "histogram", "summary")


class WorkerChannelError(AgentError):
    """The worker's channel broke (it died, or sent something unreadable)."""


def encode(msg: dict) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise WorkerChannelError(f"message of {len(body)} bytes is over the {MAX_MESSAGE}-byte limit")
    return _LEN.pack(len(body)) + body


def decode(body: bytes) -> dict:
    try:
        msg = json.loads(body)
    except ValueError:
        raise WorkerChannelError("unreadable message from the other side") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise WorkerChannelError("message without a type")
    return msg


def send(sock: socket.socket, msg: dict) -> None:
    try:
        sock.sendall(encode(msg))
    except OSError as exc:
        raise WorkerChannelError(f"cannot send to the worker: {exc.strerror or exc}") from None


def recv(sock: socket.socket) -> dict:
    head = _exactly(sock, 4)
    (n,) = _LEN.unpack(head)
    if n > MAX_MESSAGE:
        raise WorkerChannelError(f"message of {n} bytes announced (limit {MAX_MESSAGE})")
    return decode(_exactly(sock, n))


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except (OSError, TimeoutError) as exc:
            raise WorkerChannelError(f"no answer from the worker: {getattr(exc, 'strerror', None) or exc}") from None
        if not chunk:
            raise WorkerChannelError("the worker closed its channel")
        buf += chunk
    return bytes(buf)


# ------------------------------------------------------------------ metrics

def families(registry) -> list[dict]:
    """A registry's current families as plain data (JSON-able; inf/nan survive json)."""
    out = []
    for fam in registry.collect():
        out.append({"name": fam.name, "type": fam.type, "help": fam.documentation,
                    "samples": [[s.name, s.labels, s.value] for s in fam.samples
                                if not s.name.endswith("_created")]})
    return out


def _key(name: str, labels: dict) -> tuple:
    return name, tuple(sorted(labels.items()))


class Retired:
    """The cumulative samples of workers that are gone, kept so totals never go backwards."""

    def __init__(self) -> None:
        self.samples: dict[str, dict[tuple, float]] = {}
        self.meta: dict[str, tuple[str, str]] = {}

    def add(self, fams: list[dict]) -> None:
        for fam in fams:
            if fam["type"] not in CUMULATIVE_TYPES:
                continue
            self.meta[fam["name"]] = (fam["type"], fam["help"])
            acc = self.samples.setdefault(fam["name"], {})
            for name, labels, value in fam["samples"]:
                k = _key(name, labels)
                acc[k] = acc.get(k, 0.0) + value

    def as_families(self) -> list[dict]:
        return [{"name": n, "type": self.meta[n][0], "help": self.meta[n][1],
                 "samples": [[k[0], dict(k[1]), v] for k, v in acc.items()]}
                for n, acc in self.samples.items()]


# gauges that say how bad the worst process is, not how much all of them hold: the node's
# event-loop lag is its slowest loop's (the agent's or a worker's), so they merge by max
MAX_MERGED = frozenset({"hostmesh_agent_event_loop_lag_seconds"})


def merge(per_worker: Iterable[list[dict]]) -> list[Metric]:
    """One family per name; samples with the same name and labels summed (``MAX_MERGED``: the
    largest)."""
    order: list[str] = []
    meta: dict[str, tuple[str, str]] = {}
    sums: dict[str, dict[tuple, float]] = {}
    for fams in per_worker:
        for fam in fams:
            name = fam["name"]
            if name not in meta:
                meta[name] = (fam["type"], fam["help"])
                order.append(name)
                sums[name] = {}
            acc = sums[name]
            largest = name in MAX_MERGED
            for sname, labels, value in fam["samples"]:
                k = _key(sname, labels)
                prev = acc.get(k)
                acc[k] = value if prev is None else max(prev, value) if largest else prev + value
    out = []
    for name in order:
        typ, doc = meta[name]
        m = Metric(name, doc, typ)
        for (sname, labels), value in sums[name].items():
            m.add_sample(sname, dict(labels), value if not math.isnan(value) else float("nan"))
        out.append(m)
    return out
