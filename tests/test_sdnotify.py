"""The sd_notify protocol against a real AF_UNIX datagram socket standing in for systemd:
addresses (path and abstract), READY/STATUS/STOPPING/WATCHDOG, WATCHDOG_PID, pets from the
event loop only, never blocking or raising, and the agent-side reporter."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest

from nodeagent import sdnotify
from nodeagent.sdnotify import Notifier, Watchdog, parse_message
from nodeagent.service import ServiceReporter, status_line


class Manager:
    """The service manager's end: a bound datagram socket that sees senders' credentials."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def recv(self) -> tuple[dict[str, str], int]:
        """One message and the sender's pid (SCM_CREDENTIALS, as systemd reads it)."""
        data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = next(struct.unpack("3i", d)[0] for level, kind, d in anc
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        return parse_message(data), pid

    def drain(self) -> list[tuple[float, dict[str, str]]]:
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append((time.monotonic(), parse_message(self.sock.recv(4096))))
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(2.0)
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir():
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer
    d = tempfile.mkdtemp(prefix="hm-sd-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def manager(short_dir):
    path = os.path.join(short_dir, "notify")
    m = Manager(path)
    yield m, path
    m.close()


def test_addresses():
    assert sdnotify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.socket_address("@/org/freedesktop/systemd1/notify") == "\0/org/freedesktop/systemd1/notify"
    for bad in ("relative/path", "@"):
        with pytest.raises(sdnotify.NotifyError, match="NOTIFY_SOCKET"):
            sdnotify.socket_address(bad)


@pytest.mark.parametrize("env,pid,expected", [
    ({}, 7, None),
    ({"WATCHDOG_USEC": "10000000"}, 7, 10.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "7"}, 7, 10.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "8"}, 7, None),  # another process must pet
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "x"}, 7, None),
    ({"WATCHDOG_USEC": "0"}, 7, None),
    ({"WATCHDOG_USEC": "-5"}, 7, None),
    ({"WATCHDOG_USEC": "ten"}, 7, None),
])
def test_watchdog_interval(env, pid, expected):
    assert sdnotify.watchdog_interval(env, pid) == expected


def test_no_notify_socket_is_a_no_op():
    n = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog_interval is None
    assert n.ready("x") is False and n.watchdog() is False and n.stopping() is False
    assert n._sock is None  # not even a socket was made
    assert Watchdog(n).period is None


def test_messages_arrive_with_the_senders_credentials(manager):
    m, path = manager
    n = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert n.status("starting: opening listeners")
    assert m.recv() == ({"STATUS": "starting: opening listeners"}, os.getpid())
    assert n.status("starting: opening listeners")  # unchanged: nothing sent
    assert n.ready("serving 1 service\nand more")  # one line: a newline would start another assignment
    assert m.recv()[0] == {"READY": "1", "STATUS": "serving 1 service and more"}
    assert n.watchdog()
    assert m.recv()[0] == {"WATCHDOG": "1"}
    assert n.stopping("stopping: draining")
    assert m.recv()[0] == {"STOPPING": "1", "STATUS": "stopping: draining"}
    assert m.drain() == []
    n.close()


def test_abstract_namespace_socket():
    name = f"hostmesh-test-{secrets.token_hex(6)}"
    m = Manager("\0" + name)
    try:
        n = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert m.recv()[0] == {"READY": "1"}
    finally:
        m.close()


def test_from_environ_consumes_the_variables(manager):
    _, path = manager
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    n = Notifier.from_environ(env, unset=True)
    assert n.enabled and n.watchdog_interval == 2.0
    assert env == {"PATH": "/bin"}  # children (workers, iptables) do not inherit them


def test_a_gone_or_full_manager_never_raises_nor_blocks(manager, short_dir):
    gone = Notifier(os.path.join(short_dir, "nobody-listens"))
    assert gone.ready() is False and gone.dropped == 1
    m, path = manager
    n = Notifier(path)
    start = time.monotonic()
    results = [n.watchdog() for _ in range(5000)]  # nobody reads: the queue fills up
    assert time.monotonic() - start < 2.0
    assert results[0] is True and results[-1] is False and n.dropped > 0


def test_the_watchdog_pets_at_half_the_interval_from_the_loop_only(manager):
    m, path = manager
    n = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    dog = Watchdog(n)
    assert dog.period == pytest.approx(0.1)
    arrivals: list[float] = []

    def listen() -> None:  # timestamps on arrival, as the manager's timer sees them
        m.sock.settimeout(1.0)  # longer than the wedge below
        try:
            while m.sock.recv(64) == b"WATCHDOG=1":
                arrivals.append(time.monotonic())
        except (TimeoutError, OSError):
            pass

    async def run() -> None:
        dog.start()
        await asyncio.sleep(0.55)
        time.sleep(0.6)  # the loop is wedged: no callback runs, so no pet goes out
        await asyncio.sleep(0.25)
        dog.stop()

    listener = threading.Thread(target=listen)
    listener.start()
    asyncio.run(run())
    listener.join()
    pets = arrivals
    assert 7 <= len(pets) <= 12, len(pets)
    gaps = [b - a for a, b in zip(pets, pets[1:])]
    assert max(gaps) >= 0.55  # the wedge: no pet for as long as the loop was blocked
    assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.1, abs=0.05)
    assert not dog.active


def test_the_watchdog_of_another_pid_is_not_petted(manager):
    m, path = manager
    n = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
    dog = Watchdog(n)

    async def run() -> None:
        dog.start()
        await asyncio.sleep(0.2)

    asyncio.run(run())
    assert dog.pets == 0 and m.drain() == []


def test_reporter_sends_ready_once_and_status_changes(manager, monkeypatch):
    m, path = manager
    monkeypatch.setattr("nodeagent.service.STATUS_INTERVAL", 0.02)
    states = iter([(False, "waiting for config from the control plane: no config"),
                   (False, "waiting for config from the control plane: no config"),
                   (True, "serving 1 service, 2 local workloads (snapshot v1)"),
                   (False, "not ready: capture verification failed")])
    last = [(False, "")]

    def describe():
        last[0] = next(states, last[0])
        return last[0]

    rep = ServiceReporter(Notifier(path), describe)

    async def run() -> None:
        rep.start()
        rep.phase("starting: installing iptables capture")
        rep.running()
        await asyncio.sleep(0.2)
        rep.stopping("stopping: draining 0 connections (up to 10s); capture stays installed")
        rep.close("stopped; capture stays installed (fail closed)")

    asyncio.run(run())
    got = [msg for _, msg in m.drain()]
    assert got == [
        {"STATUS": "starting: installing iptables capture"},
        {"STATUS": "waiting for config from the control plane: no config"},
        {"READY": "1", "STATUS": "serving 1 service, 2 local workloads (snapshot v1)"},
        {"STATUS": "not ready: capture verification failed"},
        {"STOPPING": "1", "STATUS": "stopping: draining 0 connections (up to 10s); capture stays installed"},
        {"STATUS": "stopped; capture stays installed (fail closed)"},
    ]


def test_status_lines():
    kw = dict(services=2, workloads=1, version="abc")
    assert status_line("LIVE", True, "ready", **kw) == "serving 2 services, 1 local workload (snapshot abc)"
    assert status_line("LIVE", True, "ready; stale config since 2026-01-01T00:00:00Z: control plane x unreachable",
                       **kw) == ("serving 2 services, 1 local workload (snapshot abc); stale config since "
                                 "2026-01-01T00:00:00Z: control plane x unreachable")
    assert status_line("LIVE", False, "no config received yet", services=None, workloads=None, version=None,
                       config_from="the snapshot file") == \
        "waiting for config from the snapshot file: no config received yet"
    assert status_line("LIVE", False, "capture is not installed", **kw) == "not ready: capture is not installed"
    assert status_line("DRAINING", False, "agent is draining", **kw).startswith("draining")
    assert status_line("HANDED_OFF", False, "", successor_pid=42, **kw) == \
        "handed off to the agent with pid 42: draining"


def test_listen_fds_come_from_fd_3_for_this_pid_only(tmp_path):
    """Through the supervisor's launcher (what systemd does): fds moved to 3.., LISTEN_PID
    = the exec'd process; the names map to them and the variables are gone afterwards."""
    import subprocess
    import sys
    a, b = socket.socket(), socket.socket()
    for s in (a, b):
        s.bind(("127.0.0.1", 0))
        s.listen()
    script = ("import os, socket, sys, json; sys.path.insert(0, sys.argv[1]); from nodeagent import sdnotify; "
              "got = sdnotify.take_listen_fds(); "
              "print(json.dumps({n: [fd, socket.socket(fileno=fd).getsockname()[1]] for n, fd in got.items()}), "
              "'LISTEN_FDS' in os.environ)")
    repo = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-m", "meshlab.supervisor", "exec", "--fds", f"{a.fileno()},{b.fileno()}",
                        "--names", "outbound:admin", "--", sys.executable, "-c", script, repo],
                       pass_fds=(a.fileno(), b.fileno()), capture_output=True, text=True, timeout=30, cwd=repo)
    assert r.returncode == 0, r.stderr
    got, _, leaked = r.stdout.strip().rpartition(" ")
    assert json.loads(got) == {"outbound": [3, a.getsockname()[1]], "admin": [4, b.getsockname()[1]]}
    assert leaked.strip() == "False"
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "x:y"}
    assert sdnotify.take_listen_fds(env, pid=2) == {} and env == {}   # another process's: ignored, unset
    a.close()
    b.close()
