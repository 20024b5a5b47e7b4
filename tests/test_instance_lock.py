"""The state directory's lock: one agent per state dir, released when the holder dies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nodeagent.instance_lock import AgentRunning, InstanceLock


def test_second_holder_is_refused_with_the_holders_pid(tmp_path):
    first = InstanceLock(str(tmp_path / "state"))
    first.acquire("agent for node n1")
    try:
        with pytest.raises(AgentRunning, match=rf"uninstall for node n1: an agent is running with state directory "
                                               rf".*state \(pid {os.getpid()}\); stop it first"):
            InstanceLock(str(tmp_path / "state")).acquire("uninstall for node n1")
    finally:
        first.release()
    again = InstanceLock(str(tmp_path / "state"))
    again.acquire("uninstall for node n1")  # free once released
    assert again.held
    again.release()
    assert oct((tmp_path / "state" / "agent.lock").stat().st_mode & 0o777) == "0o600"


def test_a_killed_holder_never_blocks_its_successor(tmp_path):
    state = str(tmp_path / "state")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from nodeagent.instance_lock import InstanceLock;"
        "InstanceLock(sys.argv[1]).acquire('agent'); print('held', flush=True); time.sleep(60)"),
        state, str(Path(__file__).resolve().parent.parent)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AgentRunning, match=f"pid {holder.pid}"):
            InstanceLock(state).acquire("agent")
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs, the kernel drops the flock
        holder.wait()
    lock = InstanceLock(state)
    lock.acquire("agent")  # the stale pid in the file does not matter
    lock.release()
