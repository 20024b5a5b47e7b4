"""meshlab/supervisor.py behaves like systemd for a Type=notify unit, checked with a tiny
service that uses nodeagent.sdnotify (no root, no lab): started only on READY=1, messages
from other pids ignored (NotifyAccess=main), a stopped process killed by the watchdog
(SIGABRT + SIGCONT) and restarted after RestartSec, a clean stop not restarted, a start
timeout restarted; and the unit parser reads the shipped units."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from meshlab.errors import LabError
from meshlab.supervisor import Supervisor, expand_command, load_unit, parse_timespan

REPO = Path(__file__).resolve().parents[1]

SERVICE = textwrap.dedent("""
    import asyncio, os, subprocess, sys
    sys.path.insert(0, sys.argv[1])
    from nodeagent.sdnotify import Notifier, Watchdog
    ready_after = float(sys.argv[2])

    async def main():
        address = os.environ["NOTIFY_SOCKET"]
        n = Notifier.from_environ(unset=True)
        Watchdog(n).start()
        n.status("starting")
        # a child that inherited nothing cannot speak for the unit; one that did is ignored
        subprocess.run([sys.executable, "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX, "
                        "socket.SOCK_DGRAM); s.sendto(b'READY=1', sys.argv[1])", address])
        await asyncio.sleep(ready_after)
        n.ready("serving")
        await asyncio.Event().wait()

    asyncio.run(main())
""")


def unit(tmp_path: Path, ready_after: float, **settings: str) -> Path:
    script = tmp_path / "service.py"
    script.write_text(SERVICE)
    body = {"Type": "notify", "NotifyAccess": "main", "WatchdogSec": "1s", "Restart": "on-failure",
            "RestartSec": "300ms", "TimeoutStopSec": "5s", "TimeoutAbortSec": "2s", "KillMode": "mixed", **settings}
    path = tmp_path / "fake.service"
    lines = ["[Unit]", "Description=fake", "", "[Service]",
             f"ExecStart={sys.executable} {script} {REPO} {ready_after}",
             *(f"{k}={v}" for k, v in body.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def supervised(tmp_path):
    made = []

    def make(ready_after: float = 0.3, **settings) -> Supervisor:
        spec = load_unit(unit(tmp_path, ready_after, **settings))
        sup = Supervisor(spec, log_path=tmp_path / "service.log")
        made.append(sup)
        return sup

    yield make
    for sup in made:
        sup.close()


def test_timespans():
    assert parse_timespan("10s") == 10 and parse_timespan("1min 30s") == 90 and parse_timespan("500ms") == 0.5
    assert parse_timespan("2") == 2 and parse_timespan("5min") == 300 and parse_timespan("infinity") is None
    with pytest.raises(LabError, match="not a systemd time span"):
        parse_timespan("10 parsecs")


def test_expansion():
    env = {"ARGS": "--tls-san a --tls-san b", "ONE": "x y"}
    assert expand_command(["cp", "$ARGS", "${ONE}", "$UNSET"], env) == ["cp", "--tls-san", "a", "--tls-san", "b",
                                                                         "x y"]


def test_started_only_on_ready_and_other_pids_are_ignored(supervised):
    sup = supervised(ready_after=0.5)
    start = time.monotonic()
    sup.start()
    sup.wait(lambda ev: [e for e in ev if e.kind == "ready"], 10, "READY=1")
    ready = sup.of("ready")[0]
    assert ready.t - start >= 0.45 and sup.state == "active"
    assert sup.statuses() == ["starting", "serving"]
    ignored = sup.of("ignored")
    assert ignored and ignored[0].fields == {"READY": "1"} and ignored[0].pid != sup.main_pid
    sup.stop()
    assert sup.state == "inactive" and sup.restarts == 0
    exits = sup.of("exit")
    assert exits[-1].fields["signal"] == "SIGTERM" and exits[-1].fields["result"] == "success"


def test_a_stopped_process_is_killed_by_the_watchdog_and_restarted(supervised):
    sup = supervised()
    sup.start()
    sup.wait(lambda ev: [e for e in ev if e.kind == "ready"], 10, "READY=1")
    first = sup.main_pid
    time.sleep(1.5)  # pets keep it alive past WatchdogSec
    assert sup.state == "active" and not sup.of("watchdog-timeout")
    stopped = time.monotonic()
    os.kill(first, signal.SIGSTOP)
    sup.wait(lambda ev: [e for e in ev if e.kind == "ready" and e.pid != first], 15, "the restarted service's READY")
    timeout = sup.of("watchdog-timeout")[0]
    last_pet = [e for e in sup.of("notify") if e.pid == first and e.fields.get("WATCHDOG") == "1"][-1]
    assert last_pet.t < stopped and timeout.t - last_pet.t == pytest.approx(1.0, abs=0.15)  # WatchdogSec=1s
    kill = next(e for e in sup.of("kill") if e.fields["signal"] == "SIGABRT")
    assert kill.pid == first and kill.fields["to"] == "main"
    died = next(e for e in sup.of("exit") if e.pid == first)
    assert died.fields["signal"] == "SIGABRT" and died.fields["result"] == "watchdog"  # SIGCONT let it die
    restart = sup.of("restart")[0]
    assert restart.t - died.t >= 0.3 and sup.restarts == 1  # RestartSec=300ms


def test_a_start_timeout_is_a_failure_and_restarts(supervised):
    sup = supervised(ready_after=30, TimeoutStartSec="500ms")
    sup.start()
    sup.wait(lambda ev: [e for e in ev if e.kind == "restart"], 10, "a restart after the start timeout")
    assert sup.of("start-timeout") and sup.of("exit")[0].fields["result"] == "timeout"


def test_the_shipped_units_parse():
    agent = load_unit(REPO / "systemd" / "hostmesh-agent.service")
    assert agent.type == "notify" and agent.notify_access == "main" and agent.restart == "on-failure"
    assert agent.watchdog and agent.restart_sec and agent.kill_mode == "mixed"
    assert agent.exec_start == ("/usr/local/bin/hostmesh", "agent", "--config", "/etc/hostmesh/agent.yaml")
    cp = load_unit(REPO / "systemd" / "hostmesh-controlplane.service")
    assert cp.exec_start[:2] == ("/usr/local/bin/hostmesh", "controlplane") and cp.restart == "on-failure"


# ---------------------------------------------------------------------- FDSTORE and reload
STORING = textwrap.dedent("""
    import os, signal, socket, subprocess, sys, time
    sys.path.insert(0, sys.argv[1])
    from nodeagent import sdnotify
    n = sdnotify.Notifier.from_environ(unset=False)
    got = sdnotify.take_listen_fds()
    if os.environ.get("HANDED"):
        s = socket.socket(fileno=int(os.environ["HANDED"]))
        how = "successor"
    elif "listener" in got:
        s = socket.socket(fileno=got["listener"])
        how = "inherited"
    else:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        how = "bound"
    n.store_fds("listener", [s.fileno()])
    if how == "successor":
        n.send(READY=1, STATUS="successor serving")
    else:
        n.ready(f"{how} {s.getsockname()[1]}")

    def reload(*_):
        # the reload pattern: a successor in the unit, MAINPID=, then this one goes
        n.send(RELOADING=1)
        child = subprocess.Popen([sys.executable, *sys.argv], env={**os.environ, "HANDED": str(s.fileno())},
                                 pass_fds=(s.fileno(),))
        n.send(MAINPID=child.pid)
        time.sleep(0.3)
        os._exit(0)
    signal.signal(signal.SIGHUP, reload)
    while True:
        c, _ = s.accept()
        c.sendall(b"pid %d" % os.getpid())
        c.close()
""")


def storing_unit(tmp_path: Path, **settings: str) -> Path:
    script = tmp_path / "storing.py"
    script.write_text(STORING)
    body = {"Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "RestartSec": "1s",
            "TimeoutStopSec": "5s", "KillMode": "mixed", "FileDescriptorStoreMax": "4",
            "ExecReload": "/bin/kill -HUP $MAINPID", **settings}
    path = tmp_path / "storing.service"
    path.write_text("\n".join(["[Service]", f"ExecStart={sys.executable} {script} {REPO}",
                               *(f"{k}={v}" for k, v in body.items())]) + "\n")
    return path


def port_of(sup: Supervisor) -> int:
    return int(sup.of("ready")[-1].fields["STATUS"].split()[1])


def test_stored_descriptors_come_back_after_a_crash_and_connections_wait_meanwhile(tmp_path):
    import socket
    sup = Supervisor(load_unit(storing_unit(tmp_path)), log_path=tmp_path / "storing.log")
    try:
        sup.start()
        sup.wait(lambda ev: sup.of("ready"), 15, "READY")
        port = port_of(sup)
        assert sup.of("ready")[-1].fields["STATUS"].startswith("bound ")
        wait_store = sup.wait(lambda _: sup.fd_store, 5, "the stored socket")
        assert [n for n, _ in wait_store] == ["listener"]
        first = sup.main_pid
        os.kill(first, signal.SIGKILL)                 # a crash: Restart=on-failure after 1 s
        sup.wait(lambda ev: [e for e in ev if e.kind == "exit" and e.pid == first], 10, "the exit")
        c = socket.create_connection(("127.0.0.1", port), timeout=10)   # no agent: queued, not refused
        sup.wait(lambda ev: len(sup.of("ready")) == 2, 15, "READY after the restart")
        assert c.recv(100) == b"pid %d" % sup.main_pid     # served by the restarted process
        assert sup.of("ready")[-1].fields["STATUS"] == f"inherited {port}"
        assert len(sup.fd_store) == 1                   # the same socket stored again: one copy
        sup.restart()                                   # systemctl restart keeps the store too
        assert sup.of("ready")[-1].fields["STATUS"] == f"inherited {port}"
    finally:
        sup.close()
    assert sup.fd_store == []                           # flushed once the unit is inactive


def test_reload_follows_mainpid_to_the_successor(tmp_path):
    import socket
    sup = Supervisor(load_unit(storing_unit(tmp_path)), log_path=tmp_path / "storing.log")
    try:
        sup.start()
        sup.wait(lambda ev: sup.of("ready"), 15, "READY")
        port, first = port_of(sup), sup.main_pid
        sup.reload()
        assert sup.main_pid != first and sup.state == "active"
        assert sup.of("reloaded")[-1].fields["STATUS"] == "successor serving"
        sup.wait(lambda ev: [e for e in ev if e.kind == "exit-former" and e.pid == first], 10, "the old process")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            assert c.recv(100) == b"pid %d" % sup.main_pid
        sup.stop()                                      # stops the adopted main process
        assert sup.state == "inactive"
    finally:
        sup.close()
