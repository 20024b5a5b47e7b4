"""Listener hand-off (nodeagent/handoff.py): the protocol's checks without I/O, both ends
over a real unix socket passing real listening sockets, bad and dying peers, the lineage
counters, and two in-process agents handing over a node with no refused connection.
No privileges needed: capture is off and everything listens on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from nodeagent import handoff as ho
from nodeagent import lineage
from nodeagent.bootstrap import Bootstrap
from nodeagent.instance_lock import AgentRunning, InstanceLock
from nodeagent.state import NodeSnapshot

pytestmark = pytest.mark.timeout(60)

LISTENERS = {"outbound": "0.0.0.0:15001", "inbound": "0.0.0.0:15006", "admin": "127.0.0.1:15000"}
CAPTURE = {"mode": "iptables", "instance": ""}


def offer(**changes) -> ho.Offer:
    base = dict(node="n1", build="1+a", pid=1, generation=3, listeners=LISTENERS, capture=CAPTURE,
                counters={"handoffs": 2})
    return ho.Offer(**{**base, **changes})


def hello(**changes) -> ho.Hello:
    base = dict(node="n1", build="1+b", pid=2, listeners=LISTENERS, capture=CAPTURE)
    return ho.Hello(**{**base, **changes})


# ------------------------------------------------------------------ protocol, no I/O

def test_a_compatible_successor_differs_only_in_build_and_pid():
    assert ho.incompatibility(offer(), hello()) == ""


@pytest.mark.parametrize("changes,words", [
    ({"node": "n2"}, "serves node 'n1', the new one is for node 'n2'"),
    ({"listeners": {**LISTENERS, "outbound": "0.0.0.0:16001"}}, "outbound listener would change"),
    ({"listeners": {**LISTENERS, "tunnel": "0.0.0.0:15008"}}, "tunnel listener would change (none -> 0.0.0.0:15008)"),
    ({"capture": {"mode": "ebpf", "instance": ""}}, "capture mode would change (iptables -> ebpf)"),
    ({"capture": {"mode": "iptables", "instance": "x"}}, "capture instance would change"),
])
def test_incompatible_successors_are_told_why(changes, words):
    assert words in ho.incompatibility(offer(), hello(**changes))


@pytest.mark.parametrize("line,error", [
    (b"not json", "malformed message"),
    (b"[1,2]", "malformed message"),
    (b'{"type": 3}', "malformed message"),
    (b'{"type": "TAKE"}', "expected WELCOME from the other agent, got TAKE"),
    (b'{"type": "ABORT", "error": "config broken"}', "the new agent gave up: config broken"),
])
def test_bad_lines_raise_our_error(line, error):
    with pytest.raises(ho.HandoffError, match=error):
        ho.decode(line, "WELCOME")


def test_refuse_raises_refused():
    with pytest.raises(ho.HandoffRefused, match="nope"):
        ho.decode(b'{"type": "REFUSE", "error": "nope"}', "WELCOME")


@pytest.mark.parametrize("msg", [{}, {"node": "n"}, {"node": 1, "build": "b", "pid": 1, "listeners": {}, "capture": {}},
                                 {"node": "n", "build": "b", "pid": "1", "listeners": {}, "capture": {}},
                                 {"node": "n", "build": "b", "pid": 1, "listeners": {"a": 1}, "capture": {}}])
def test_malformed_hello(msg):
    with pytest.raises(ho.HandoffError, match="malformed HELLO"):
        ho.Hello.parse(msg)


# ------------------------------------------------------------------ lineage

def test_lineage_counts_starts_and_handoffs(tmp_path):
    assert lineage.load(str(tmp_path)) == lineage.Lineage(0, 0)
    first = lineage.Lineage().successor()
    assert (first.generation, first.restarts, first.handoffs) == (1, 0, 0)
    lineage.save(str(tmp_path), first)
    after_crash = lineage.load(str(tmp_path)).successor()
    assert (after_crash.generation, after_crash.restarts, after_crash.handoffs) == (2, 1, 0)
    # a predecessor that knows more (its file write was lost) wins
    taken = after_crash.successor(predecessor=lineage.Lineage(7, 4))
    assert (taken.generation, taken.handoffs) == (8, 5)


def test_corrupt_lineage_file_starts_from_zero(tmp_path):
    (tmp_path / lineage.FILE_NAME).write_text("{broken")
    assert lineage.load(str(tmp_path)) == lineage.Lineage()
    (tmp_path / lineage.FILE_NAME).write_text('["list"]')
    assert lineage.load(str(tmp_path)) == lineage.Lineage()


def test_build_id_names_version_and_sources(monkeypatch, tmp_path):
    from hostmesh import __version__
    bid = lineage.build_id()
    assert bid.startswith(__version__ + "+") and len(bid.split("+")[1]) == 12
    assert lineage.build_id() == bid
    bpf = tmp_path / "bpf"
    bpf.mkdir()
    (bpf / "x.c").write_text("int x;")
    monkeypatch.setenv("HOSTMESH_BPF_DIR", str(bpf))
    assert lineage.build_id() != bid  # other eBPF programs: another build


# ------------------------------------------------------------------ both ends, real sockets

class Predecessor:
    """A HandoffServer over real listening sockets, with recording hooks."""

    def __init__(self, state_dir: Path, **offer_changes) -> None:
        self.listen = {}
        for name in ("outbound", "admin"):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(16)
            self.listen[name] = s
        self.released: list[ho.Hello] = []
        self.outcomes: list[tuple[str, str]] = []
        self.server = ho.HandoffServer(str(state_dir), ho.HandoffHooks(
            offer=lambda: offer(**offer_changes), listener_fds=lambda: ho.fds_of(self.listen),
            release=self.released.append, outcome=lambda r, w: self.outcomes.append((r, w))),
            take_timeout=5, step_timeout=5)
        self.server.start()

    def port(self, name: str) -> int:
        return self.listen[name].getsockname()[1]

    def close(self) -> None:
        self.server.close()
        for s in self.listen.values():
            s.close()


@pytest.fixture
def pred(tmp_path):
    p = Predecessor(tmp_path)
    yield p
    p.close()


def wait(cond, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_socket_is_private_and_found(pred, tmp_path):
    path = tmp_path / ho.SOCKET_NAME
    assert ho.HandoffClient.available(str(tmp_path))
    assert (path.stat().st_mode & 0o777) == 0o600
    assert not ho.HandoffClient.available(str(tmp_path / "elsewhere"))


def test_full_exchange_passes_the_same_listening_sockets(pred, tmp_path):
    client = ho.HandoffClient(str(tmp_path))
    who = client.connect(hello())
    assert (who.pid, who.generation, who.counters) == (1, 3, {"handoffs": 2})
    # a connection that arrives before the take waits in the shared accept queue
    early = socket.create_connection(("127.0.0.1", pred.port("outbound")))
    got = client.take()
    assert set(got) == {"outbound", "admin"}
    assert got["outbound"].getsockname() == pred.listen["outbound"].getsockname()
    pred.listen["outbound"].close()  # the predecessor stops accepting: the successor's copy lives on
    got["outbound"].setblocking(True)
    got["outbound"].settimeout(2)
    conn, _ = got["outbound"].accept()
    late = socket.create_connection(("127.0.0.1", got["outbound"].getsockname()[1]))
    conn2, _ = got["outbound"].accept()
    for s in (conn, conn2, early, late, *got.values()):
        s.close()
    client.serving()
    assert [h.pid for h in pred.released] == [2]
    wait(lambda: pred.outcomes, "the outcome")
    assert pred.outcomes == [("given", "")]
    assert pred.server.handed_off.is_set()


def test_an_incompatible_successor_is_refused_and_the_next_may_take_over(pred, tmp_path):
    with pytest.raises(ho.HandoffRefused, match="capture mode would change"):
        ho.HandoffClient(str(tmp_path)).connect(hello(capture={"mode": "ebpf", "instance": ""}))
    wait(lambda: pred.outcomes, "the outcome")
    assert pred.outcomes[0][0] == "refused" and not pred.released
    client = ho.HandoffClient(str(tmp_path))
    client.connect(hello())
    for s in client.take().values():
        s.close()
    client.serving()
    assert pred.released


@pytest.mark.parametrize("how", ["abort", "die_after_hello", "die_after_take", "garbage"])
def test_a_successor_that_gives_up_changes_nothing(pred, tmp_path, how):
    client = ho.HandoffClient(str(tmp_path))
    if how == "garbage":
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(tmp_path / ho.SOCKET_NAME))
        raw.sendall(b"\x00\xffnot a message\n")
        raw.close()
    else:
        client.connect(hello())
        if how == "abort":
            client.abort("no snapshot")
        elif how == "die_after_hello":
            client.close()
        else:
            for s in client.take().values():
                s.close()
            client.close()
    wait(lambda: pred.outcomes, "the outcome")
    assert pred.outcomes[0][0] == "aborted", pred.outcomes
    assert not pred.released and not pred.server.handed_off.is_set()
    # still listening, still offering
    socket.create_connection(("127.0.0.1", pred.port("outbound"))).close()
    assert ho.HandoffClient(str(tmp_path)).connect(hello()).pid == 1


def test_a_silent_successor_times_out(tmp_path):
    p = Predecessor(tmp_path)
    p.server.step_timeout = 0.3
    try:
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(tmp_path / ho.SOCKET_NAME))
        wait(lambda: p.outcomes, "the timeout")
        assert p.outcomes[0][0] == "aborted"
        raw.close()
    finally:
        p.close()


def test_the_client_explains_a_missing_predecessor(tmp_path):
    with pytest.raises(ho.HandoffError, match="cannot reach the running agent"):
        ho.HandoffClient(str(tmp_path)).connect(hello())


def test_close_removes_only_our_socket_file(tmp_path):
    p = Predecessor(tmp_path)
    path = tmp_path / ho.SOCKET_NAME
    p.server.close()
    assert not path.exists()
    p2 = Predecessor(tmp_path)
    p.server.close()  # an old server closing again must not remove the new one's file
    assert path.exists()
    p2.close()
    p.close()


# ------------------------------------------------------------------ two agents, one node

def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def agent_boot(tmp_path: Path, ports: list[int], **changes) -> Bootstrap:
    snap = tmp_path / "snapshot.json"
    if not snap.exists():
        snap.write_text(json.dumps(NodeSnapshot(node="n1", version="v1").to_dict()))
    out, inb, adm = ports
    fields = dict(node="n1", capture_mode="none", snapshot_file=str(snap), state_dir=str(tmp_path / "state"),
                  outbound_port=out, inbound_port=inb, admin_host="127.0.0.1", admin_port=adm, socket_mark=0,
                  drain_grace=2.0)
    return Bootstrap(**{**fields, **changes})


async def start_live(agent) -> tuple:
    """Run ``agent`` until it is LIVE and serves hand-offs; (agent, its run task)."""
    run = asyncio.create_task(agent.run())
    while agent.life.state != "LIVE" or (agent.boot.handoff_enabled and agent.handoff is None):
        assert not run.done(), run.exception()
        await asyncio.sleep(0.01)
    return agent, run


class Dialer:
    """New connections to 127.0.0.1:``port`` every 2 ms until ``stop()``: ``dialed`` counts
    those accepted (a reset after accept included), ``refused`` keeps the failures."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.dialed = 0
        self.refused: list[Exception] = []
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                self.dialed += 1
            except ConnectionResetError:
                self.dialed += 1  # accepted, then refused by the proxy (no original destination)
            except OSError as exc:
                self.refused.append(exc)
            await asyncio.sleep(0.002)

    async def stop(self) -> None:
        self._stop.set()
        await self._task


async def admin_json(port: int, path: str) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def test_two_agents_hand_over_without_refusing_a_connection(tmp_path):
    from nodeagent.agent import Agent

    ports = free_ports(3)

    async def main():
        first, first_run = await start_live(Agent(agent_boot(tmp_path, ports)))
        dialer = Dialer(ports[2])
        second, second_run = await start_live(Agent(agent_boot(tmp_path, ports)))
        assert await asyncio.wait_for(first_run, 10) == 0
        info = await admin_json(ports[2], "/server_info")
        await dialer.stop()
        second._stop.set()
        assert await asyncio.wait_for(second_run, 10) == 0
        return first, second, info, dialer.refused, dialer.dialed

    first, second, info, refused, connected = asyncio.run(main())
    assert not refused and connected >= 3
    assert first.life.successor_pid == os.getpid() and first.life.state == "STOPPED"
    assert info["generation"] == 2 and info["handoffs"] == 1 and info["restarts"] == 1
    assert info["predecessor"]["generation"] == 1 and info["workers"]["count"] == 1
    assert lineage.load(str(tmp_path / "state")) == lineage.Lineage(2, 1)
    assert second.metrics.handoffs._value.get() == 1


def test_a_successor_without_config_gives_up_and_the_agent_keeps_serving(tmp_path):
    from nodeagent.agent import Agent
    from nodeagent.errors import AgentError

    ports = free_ports(3)

    async def main():
        first, first_run = await start_live(Agent(agent_boot(tmp_path, ports)))
        # a successor whose control plane never answers has nothing to serve with
        nowhere = free_ports(1)[0]
        second = Agent(agent_boot(tmp_path, ports, handoff_timeout=0.5, snapshot_file="",
                                  control_plane=f"127.0.0.1:{nowhere}", cp_insecure=True))
        with pytest.raises(AgentError, match="not ready to take over within 0.5s"):
            await second.run()
        await asyncio.sleep(0.1)
        assert first.life.state == "LIVE"
        info = await admin_json(ports[2], "/server_info")
        failures = first.metrics.handoff_failures.labels("aborted")._value.get()
        first._stop.set()
        await first_run
        return info, failures

    info, failures = asyncio.run(main())
    assert info["generation"] == 1 and failures == 1


def test_handoff_disabled_refuses_as_before(tmp_path):
    from nodeagent.agent import Agent

    ports = free_ports(3)

    async def main():
        first, first_run = await start_live(Agent(agent_boot(tmp_path, ports)))
        with pytest.raises(AgentRunning, match="an agent is running"):
            await Agent(agent_boot(tmp_path, ports, handoff_enabled=False)).run()
        first._stop.set()
        await first_run

    asyncio.run(main())


def test_several_sockets_per_listener_travel_as_numbered_names():
    a, b, c, adm = (socket.socket() for _ in range(4))
    try:
        fds = ho.fds_of({"outbound": [a, b], "inbound": [c], "admin": adm})
        assert list(fds) == ["outbound", "outbound#1", "inbound", "admin"]
        back = ho.grouped({"outbound#1": b, "inbound": c, "outbound": a})
        assert back == {"inbound": [c], "outbound": [a, b]}
        assert all(ho._wire_name_ok(n) for n in fds)
        assert not any(ho._wire_name_ok(n) for n in ("admin#1", "outbound#0", "outbound#x", "other", "tunnel#"))
    finally:
        for s in (a, b, c, adm):
            s.close()


def test_reuseport_listeners_still_refuse_a_port_someone_else_holds():
    from nodeagent.errors import ProxyError
    from nodeagent.proxy.listener import listen_socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        with pytest.raises(ProxyError, match="address already in use"):
            listen_socket("127.0.0.1", holder.getsockname()[1], 16, reuseport=True)
    finally:
        holder.close()
    ours = listen_socket("127.0.0.1", 0, 16, reuseport=True)
    try:
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    finally:
        ours.close()


def test_a_stored_socket_is_used_only_where_it_fits_the_bootstrap():
    import socket as so
    from nodeagent.handoff import stored_socket_mismatch
    lst = so.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    port = lst.getsockname()[1]
    try:
        assert stored_socket_mismatch(lst, f"127.0.0.1:{port}") == ""
        assert stored_socket_mismatch(lst, "127.0.0.1:0") == ""           # any port configured
        assert "the bootstrap wants 0.0.0.0:15001" in stored_socket_mismatch(lst, "0.0.0.0:15001")
        assert stored_socket_mismatch(lst, None) == "no such listener in this bootstrap"
        unlistened = so.socket()
        assert stored_socket_mismatch(unlistened, "127.0.0.1:0") == "not a listening TCP socket"
        unlistened.close()
        udp = so.socket(so.AF_INET, so.SOCK_DGRAM)
        assert stored_socket_mismatch(udp, "127.0.0.1:0") == "not a listening TCP socket"
        udp.close()
    finally:
        lst.close()


def test_the_health_endpoint_serves_probes_and_metrics_only_and_is_handed_over(tmp_path):
    """admin.healthAddress: /healthz, /ready, /metrics for probes and Prometheus from off the
    node; no views, no POSTs. Its socket goes to a successor with the others."""
    from nodeagent.agent import Agent

    ports = free_ports(4)

    async def get(port, method, path):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        data = await r.read()
        w.close()
        return int(data.split(b" ", 2)[1]), data

    async def main():
        boot = agent_boot(tmp_path, ports[:3], health_host="127.0.0.1", health_port=ports[3])
        first, first_run = await start_live(Agent(boot))
        seen = {p: (await get(ports[3], "GET", p))[0] for p in ("/healthz", "/ready", "/metrics", "/config_dump")}
        quit_status, _ = await get(ports[3], "POST", "/quitquitquit")
        dialer = Dialer(ports[3])
        second, second_run = await start_live(Agent(boot))
        assert await asyncio.wait_for(first_run, 10) == 0
        after, body = await get(ports[3], "GET", "/metrics")
        await dialer.stop()
        second._stop.set()
        assert await asyncio.wait_for(second_run, 10) == 0
        return seen, quit_status, after, body, dialer.refused, first

    seen, quit_status, after, body, refused, first = asyncio.run(main())
    assert seen == {"/healthz": 200, "/ready": 200, "/metrics": 200, "/config_dump": 404}
    assert quit_status == 404 and first.life.successor_pid == os.getpid()   # not shut down by it
    assert after == 200 and b"hostmesh_agent_generation 2.0" in body and not refused
