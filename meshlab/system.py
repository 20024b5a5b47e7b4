"""Thin wrappers around the commands and kernel files meshlab drives (ip, nsenter, cgroupfs)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from meshlab.errors import LabError

NETNS_DIR = Path("/run/netns")


def run(argv: list[str], *, input: str | None = None, timeout: float = 30) -> str:
    """Run a command; a failure raises LabError carrying the command and its stderr."""
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LabError(f"{argv[0]} is not installed (run ./quickstart install)") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)} did not finish within {timeout:g}s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"{' '.join(argv[:6])}{' ...' if len(argv) > 6 else ''} failed: {detail}")
    return proc.stdout


def ip_batch(ns: str | None, commands: list[str]) -> None:
    """Run many `ip` commands in one process (fast and all-or-error)."""
    if not commands:
        return
    argv = ["ip"] + (["-n", ns] if ns else []) + ["-batch", "-"]
    run(argv, input="\n".join(commands) + "\n")


def list_netns() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def add_netns(name: str) -> None:
    run(["ip", "netns", "add", name])


def delete_netns(name: str) -> None:
    if (NETNS_DIR / name).exists():
        run(["ip", "netns", "delete", name])


def netns_pids(name: str) -> set[int]:
    """Processes whose network namespace is `name` (what `ip netns pids` reports)."""
    try:
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10).stdout
    except (subprocess.TimeoutExpired, FileNotFoundError):
        return set()
    return {int(x) for x in out.split() if x.isdigit()}


def sysctl(ns: str, settings: dict[str, str]) -> None:
    # /proc/sys/net is per network namespace of the reading task, so nsenter is enough.
    run(["nsenter", f"--net={NETNS_DIR / ns}", "sysctl", "-q", "-w"] + [f"{k}={v}" for k, v in settings.items()])


def enter_argv(ns: str, cgroup_procs: str, argv: list[str]) -> list[str]:
    """argv that runs `argv` inside network namespace `ns` and cgroup `cgroup_procs`.

    The shell moves itself into the cgroup and then execs the command, so the command and
    everything it forks stay in the cgroup (where eBPF capture attaches) and the namespace.
    """
    return [
        "nsenter", f"--net={NETNS_DIR / ns}", "--",
        "/bin/sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "hostmesh-lab", cgroup_procs, *argv,
    ]


def kill_all(pids: set[int], grace: float = 3.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL whatever is left."""
    pids = {p for p in pids if p != os.getpid()}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if _alive(p)}
            if pids:
                time.sleep(0.05)
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        # reap our own children so they do not linger as zombies
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
