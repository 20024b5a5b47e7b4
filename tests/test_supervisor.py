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
