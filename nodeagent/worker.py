"""A proxy worker process: one ``NodeProxy`` on listening sockets the agent owns.

    python -m nodeagent.worker --channel FD     (started by the agent, never by hand)

The agent (``nodeagent.workers``) starts ``workers: N`` of these with the listening
sockets and one end of a socketpair inherited. Everything a worker knows comes over that
channel (``worker_wire``): the bootstrap, snapshots, which certificates exist (it builds
its TLS contexts from the files: ``identity.mirror``), JWKS bodies; it answers metrics
and connection counts. It writes no shared state: config, certificates, capture and the
admin endpoint stay in the agent. The kernel spreads new connections over the workers
accepting on the same socket; a connection stays in the worker that accepted it, and so
do connection pools, tunnel pools and per-connection memos.

A worker exits when its channel closes and, through PR_SET_PDEATHSIG, when the agent
dies, so no orphan ever holds the node's ports.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
from dataclasses import fields

from nodeagent import logs
from nodeagent import worker_wire as wire
from nodeagent.bootstrap import Bootstrap
from nodeagent.capture.origdst import so_original_dst
from nodeagent.identity.mirror import IdentityMirror
from nodeagent.proxy import NodeProxy
from nodeagent.proxy.jwks import JwksCache
from nodeagent.state import AgentState, NodeSnapshot
from nodeagent.telemetry import LoopLag, MetricsRegistry

log = logging.getLogger("hostmesh.worker")

PR_SET_PDEATHSIG = 1


def bootstrap_from(d: dict) -> Bootstrap:
    """The inverse of ``bootstrap_to``: tuples come back as tuples."""
    kwargs = {}
    for f in fields(Bootstrap):
        if f.name in d:
            v = d[f.name]
            kwargs[f.name] = tuple(v) if isinstance(v, list) else v
    return Bootstrap(**kwargs)


def bootstrap_to(boot: Bootstrap) -> dict:
    return {f.name: (list(v) if isinstance(v := getattr(boot, f.name), tuple) else v) for f in fields(Bootstrap)}


class Worker:
    """The worker's state and its answers to the agent's messages."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.registry = MetricsRegistry()
        self.loop_lag = LoopLag(self.registry)  # merged by max with the agent's (worker_wire.MAX_MERGED)
        self._lag_task: asyncio.Task | None = None
        self.state = AgentState()
        self.identities = IdentityMirror()
        self.jwks = JwksCache()
        self.proxy: NodeProxy | None = None
        self.boot: Bootstrap | None = None
        self.index = 0
        self.fds: dict[str, list[int]] = {}
        self.with_identities = False  # the agent has a certificate manager (mTLS)
        self._done = asyncio.Event()
        self._draining = False

    # ---------------------------------------------------------------- messages
    def handle(self, msg: dict) -> dict | None:
        """One message from the agent; the answer for requests (they carry an ``id``)."""
        kind = msg["type"]
        if kind == "init":
            self.boot = bootstrap_from(msg["bootstrap"])
            self.index = int(msg.get("worker", 0))
            self.fds = {str(k): [int(fd) for fd in v] for k, v in msg["listeners"].items()}
            self.with_identities = bool(msg.get("identities"))
        elif kind == "snapshot":
            self.state.apply(NodeSnapshot.from_dict(msg["snapshot"], source="agent"))
        elif kind == "identities":
            self.identities.update(msg.get("trust_domain", ""), msg.get("identities", []))
        elif kind == "jwks":
            if msg.get("body") is None:
                self.jwks.forget(msg["uri"])
            else:
                self.jwks.record_body(msg["uri"], msg["body"].encode("latin-1"))
        elif kind == "metrics":
            return {"families": wire.families(self.registry)}
        elif kind == "stats":
            return self.stats()
        elif kind == "describe":
            return self.describe()
        elif kind == "resilience":
            return {"destinations": self.resilience()}
        elif kind == "stop_accepting":
            if self.proxy is not None:
                self.proxy.stop_accepting()
        elif kind == "drain":
            asyncio.get_running_loop().create_task(self.drain(float(msg.get("grace", 10.0))))
        return None

    def describe(self) -> dict:
        """What this worker holds (for /config_dump: every worker runs the same config)."""
        snap = self.state.snapshot
        return {"worker": self.index, "pid": os.getpid(), "snapshot_version": snap.version if snap else None,
                "identities": sorted(i.uri for i in self.identities._held), "jwks": self.jwks.uris()}

    def resilience(self) -> dict:
        """The live retry/outlier/rate-limit state of this worker's destinations (/clusters)."""
        return self.proxy.outbound.resilience_view() if self.proxy is not None else {}

    def stats(self) -> dict:
        p = self.proxy
        if p is None:
            return {"outbound": 0, "inbound": 0, "tunnel": 0, "draining": self._draining}
        return {"outbound": p.outbound.active_connections, "inbound": p.inbound.active_connections,
                "tunnel": len(p.inbound.tunnel.connections) if p.inbound.tunnel is not None else 0,
                "draining": self._draining}

    async def start(self) -> None:
        from nodeagent.agent import proxy_inputs  # the same inputs as an in-process proxy

        boot = self.boot
        inputs = proxy_inputs(boot, self.state, self.registry,
                              identities=self.identities if self.with_identities else None,
                              jwks_keys=self.jwks.keys, original_destination=so_original_dst,
                              capturing=boot.capture_mode != "none")
        self.proxy = NodeProxy(inputs, outbound_port=boot.outbound_port, inbound_port=boot.inbound_port)
        inherited = {}
        for name, fds in self.fds.items():
            inherited[name] = [socket.socket(fileno=fd) for fd in fds]
            for s in inherited[name]:
                s.setblocking(False)
        await self.proxy.start(inherited)
        self._lag_task = asyncio.get_running_loop().create_task(self.loop_lag.run())

    async def drain(self, grace: float) -> None:
        if self._draining:
            return
        self._draining = True
        aborted = await self.proxy.drain(grace) if self.proxy is not None else 0
        log.info("worker drained", extra={"worker": self.index, "aborted_connections": aborted})
        self._done.set()

    # ---------------------------------------------------------------- the channel
    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_unix_connection(sock=self.channel, limit=wire.MAX_MESSAGE)
        reading = loop.create_task(self._read(reader, writer))
        done = loop.create_task(self._done.wait())
        await asyncio.wait({reading, done}, return_when=asyncio.FIRST_COMPLETED)
        if not done.done():  # the channel closed: the agent is gone
            done.cancel()
            if self.proxy is not None:
                self.proxy.close()
            return 0
        reading.cancel()
        return 0

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(head, "big"))
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            msg = wire.decode(body)
            if msg["type"] == "start":
                await self.start()
                writer.write(wire.encode({"type": "ready", "pid": os.getpid()}))
                continue
            try:
                answer = self.handle(msg)
            except Exception as exc:  # a bad message must not kill the data path
                log.exception("worker: cannot handle %s", msg.get("type"))
                answer = {"error": f"{type(exc).__name__}: {exc}"} if "id" in msg else None
            if "id" in msg:
                writer.write(wire.encode({"type": "reply", "id": msg["id"], **(answer or {})}))


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nodeagent.worker")
    ap.add_argument("--channel", type=int, required=True)
    ap.add_argument("--parent", type=int, required=True, help="the agent's pid")
    ap.add_argument("--log-level", default="info")
    a = ap.parse_args(argv)
    _die_with_parent()
    if os.getppid() != a.parent:  # the agent died before prctl took effect
        return 1
    logs.setup(a.log_level)
    # the agent decides when to stop (drain message); a terminal's Ctrl-C reaches the agent
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import uvloop

    channel = socket.socket(fileno=a.channel)
    channel.setblocking(False)
    from nodeagent.agent import raise_fd_limit
    raise_fd_limit()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(Worker(channel).serve())


if __name__ == "__main__":
    sys.exit(main())
