"""What the agent tells its service manager (systemd, ``Type=notify``): READY, STATUS, STOPPING, and the watchdog.

``READY=1`` goes out once, the first time the agent is ready in the sense of ``/ready``:
LIVE, a config (snapshot) applied, capture installed and verified, workload certificates
valid. Until then systemd keeps the unit "activating" and units ordered after it wait.
``STATUS=`` says what the agent is doing (starting, installing capture, waiting for
config from the control plane, serving N services or serving a stale config, draining);
it is polled from the agent's views, so it follows changes that have no callback
(certificates expiring, a control plane going away). ``WATCHDOG=1`` is sent from the
event loop (``nodeagent.sdnotify.Watchdog``): a wedged loop is killed and restarted.

**A stop under systemd does not remove capture.** ``systemctl stop`` and ``restart`` send
SIGTERM to the main process (``KillMode=mixed``); the agent sends ``STOPPING=1``, drains for
``drainGrace`` and exits, and leaves its iptables chains or eBPF programs in place, exactly
as after a crash or a watchdog kill (SIGABRT). There is no window in which workload traffic
goes around the proxy, whether the unit restarts, crash-loops or stays stopped. The agent
keeps its listening sockets in the unit's file descriptor store (FDSTORE=1), so until the
next agent runs, captured connections wait in their accept queues (without a store they
are refused: fail closed). The next start adopts what is installed and the stored sockets.
``systemctl reload`` hands over to a new agent inside the unit (``nodeagent/reload.py``). Capture is removed only explicitly: ``hostmesh
agent --config /etc/hostmesh/agent.yaml --uninstall`` once the unit is stopped (it refuses
while an agent holds the state directory), which ``hostmesh uninstall`` does for you.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from nodeagent.sdnotify import Notifier, Watchdog

STATUS_INTERVAL = 0.5  # how often STATUS is recomputed (only a change is sent)


def status_line(state: str, ready: bool, why: str, *, services: int | None, workloads: int | None,
                version: str | None, config_from: str = "the control plane", successor_pid: int | None = None) -> str:
    """One line for ``systemctl status``, from the agent's lifecycle state and readiness."""
    if state == "HANDED_OFF":
        return f"handed off to the agent with pid {successor_pid}: draining"
    if state == "DRAINING":
        return "draining: not accepting new connections; capture stays installed (fail closed)"
    if state == "STOPPED":
        return "stopped; capture stays installed (fail closed)"
    if not ready:
        if services is None:
            return f"waiting for config from {config_from}: {why}"
        return f"not ready: {why}"
    text = f"serving {services} service{'s' * (services != 1)}, {workloads} local " \
           f"workload{'s' * (workloads != 1)} (snapshot {version})"
    stale = why.partition("; ")[2]  # readiness says "ready; stale config since ..." when stale
    return f"{text}; {stale}" if stale else text


class ServiceReporter:
    """Drives a Notifier from the agent: phases while starting, then READY and STATUS from
    ``describe()`` (``(ready, status line)``), STOPPING at shutdown; pets the watchdog."""

    def __init__(self, notifier: Notifier, describe: Callable[[], tuple[bool, str]]) -> None:
        self.notifier = notifier
        self.describe = describe
        self.watchdog = Watchdog(notifier)
        self.ready_sent = False
        self._poll: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_environ(cls, describe: Callable[[], tuple[bool, str]]) -> ServiceReporter:
        # the variables are this process's: workers and tools it starts must not inherit them
        return cls(Notifier.from_environ(unset=True), describe)

    def start(self) -> None:
        """On the agent's running loop: pet the watchdog from now on."""
        self._loop = asyncio.get_running_loop()
        self.watchdog.start(self._loop)

    def phase(self, text: str) -> None:
        """What the agent is doing before it runs (start-up steps)."""
        self.notifier.status(text)

    def running(self) -> None:
        """The agent is LIVE: from now on READY and STATUS follow ``describe()``."""
        if self.notifier.enabled and self._loop is not None and self._poll is None:
            self._report()

    def _report(self) -> None:
        ready, text = self.describe()
        if ready and not self.ready_sent:
            self.notifier.ready(text)
            self.ready_sent = True  # once: systemd has no way back to "activating"
        else:
            self.notifier.status(text)
        self._poll = self._loop.call_later(STATUS_INTERVAL, self._report)

    def reloading(self, text: str) -> None:
        """RELOADING=1: the unit is "reloading" until READY=1 (from the new agent, or below)."""
        self.notifier.send(RELOADING=1, STATUS=text)

    def reload_failed(self, text: str) -> None:
        """READY=1 again from this agent: the reload is over and it still serves."""
        self.notifier.send(READY=1, STATUS=text)

    def stopping(self, text: str) -> None:
        """Shutting down: STOPPING=1 once; STATUS is no longer polled (the watchdog still runs
        while the agent drains: a drain that wedges the loop is a hang like any other)."""
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        self.notifier.stopping(text)

    def close(self, text: str = "") -> None:
        if text:
            self.notifier.status(text)
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        self.watchdog.stop()
        self.notifier.close()
