"""``systemctl reload`` (SIGHUP): restart or upgrade the agent inside its unit, refusing nothing.

The running agent starts a new agent process from the same command line (so a new binary
or a changed bootstrap on disk is picked up), in the same cgroup, with the service
manager's notify variables. The new agent takes the listeners over through the ordinary
hand-off (nodeagent/handoff.py). Just before the old agent lets go, it tells the manager
``MAINPID=<new pid>``, so the unit follows the new process; the new one sends ``READY=1``
(ending the ``RELOADING=1`` state) and the old one drains and exits like any predecessor.
If the new agent exits or does not take over in time, the old one tells the manager
``READY=1`` with the reason and keeps serving.

This is the unit-internal form of "start the new agent next to the running one": nginx's
and HAProxy's binary-upgrade pattern, with systemd told who the main process is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping


def successor_argv() -> list[str]:
    """This process's own command line, interpreter included (``python -m hostmesh.cli agent
    ...`` or ``/usr/bin/python3 /usr/local/bin/hostmesh agent ...``)."""
    return list(sys.orig_argv)


def spawn_successor(notify_env: Mapping[str, str]) -> subprocess.Popen:
    """Start the new agent. It inherits stdout/stderr (the journal) and the manager's notify
    socket and watchdog interval; not WATCHDOG_PID, which names this process."""
    env = {**os.environ, **notify_env}
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen(successor_argv(), env=env, stdin=subprocess.DEVNULL, close_fds=True)
