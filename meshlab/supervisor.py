"""A small service manager that does for one ``Type=notify`` unit what systemd does, for
tests and the lab (systemd is not PID 1 here).

It reads the unit file itself (``load_unit``: ExecStart, Type, NotifyAccess, WatchdogSec,
Restart, RestartSec, TimeoutStartSec/StopSec/AbortSec, KillMode, KillSignal, Environment,
EnvironmentFile), so a test exercises the shipped unit's values, and mirrors systemd's
rules for them:

- a datagram notify socket (SO_PASSCRED) is created and passed as ``$NOTIFY_SOCKET``, with
  ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` (the main process's own pid, as systemd sets it);
- ``NotifyAccess=main``: only messages whose sender credentials are the main pid count,
  others are recorded as ignored;
- the unit is started (``active``) only on ``READY=1``; no READY within TimeoutStartSec is
  a failure: SIGTERM, SIGKILL after TimeoutStopSec;
- the watchdog is armed when start-up completes (READY=1) and re-armed by every
  ``WATCHDOG=1``; when it expires the main process gets SIGABRT (``WatchdogSignal=``) and
  SIGCONT (systemd always follows a kill signal with SIGCONT, so a stopped process dies
  too), and whatever is left after TimeoutAbortSec gets SIGKILL;
- ``Restart=on-failure``: a non-zero exit, a signal other than SIGHUP/SIGINT/SIGTERM/SIGPIPE,
  a start timeout or a watchdog timeout restarts the unit after RestartSec; a clean exit
  or ``stop()`` does not;
- ``KillMode=mixed``: the stop signal goes to the main process only, the final SIGKILL to
  everything that is left.

Differences from systemd, on purpose: processes are tracked by their process group (the
unit's processes start in a new session), not by a cgroup of their own, so the lab can put
them into its own cgroups; there is no start-rate limit (StartLimitIntervalSec=0 in our
units anyway). Every message and transition is recorded with a monotonic timestamp
(``events``) for tests to check the order of things.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from meshlab.errors import LabError

MAX_FDS = 253  # SCM_MAX_FD: what one message can carry

_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*([a-zµ]*)")
_UNIT_SECONDS = {
    "": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6, "µs": 1e-6,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0, "d": 86400.0, "day": 86400.0, "days": 86400.0,
}
CLEAN_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE)
SYSTEMD_DEFAULT_TIMEOUT = 90.0  # DefaultTimeoutStartSec= / StopSec= of systemd-system.conf


def parse_timespan(text: str, where: str = "time span") -> float | None:
    """systemd.time(7) spans: ``10s``, ``1min 30s``, ``500ms``, unit-less seconds; None for infinity."""
    text = text.strip()
    if text == "infinity":
        return None
    pos, total = 0, 0.0
    for m in _SPAN.finditer(text):
        if text[pos:m.start()].strip() or m.group(2) not in _UNIT_SECONDS:
            raise LabError(f"{where}: {text!r} is not a systemd time span")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not text or text[pos:].strip():
        raise LabError(f"{where}: {text!r} is not a systemd time span")
    return total


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every assignment, in order (continuation lines joined, comments dropped)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    lines = text.replace("\\\n", " ").splitlines()
    for raw in lines:
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        if not sep or current is None:
            raise LabError(f"unit file line {raw!r} is neither a [Section] nor Key=Value")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_environment_file(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def expand_command(argv: list[str], env: dict[str, str]) -> list[str]:
    """systemd's ExecStart= expansion: ``$VAR`` becomes words (split on whitespace, none when
    unset), ``${VAR}`` exactly one word."""
    out: list[str] = []
    for word in argv:
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if m:
            out += env.get(m.group(1), "").split()
            continue
        out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda mm: env.get(mm.group(1), ""), word))
    return out


@dataclass(frozen=True)
class UnitSpec:
    """What a supervisor needs from a service unit, with systemd's defaults."""

    exec_start: tuple[str, ...]
    type: str = "simple"
    notify_access: str = "none"
    watchdog: float | None = None
    restart: str = "no"
    restart_sec: float = 0.1
    timeout_start: float | None = SYSTEMD_DEFAULT_TIMEOUT
    timeout_stop: float | None = SYSTEMD_DEFAULT_TIMEOUT
    timeout_abort: float | None = SYSTEMD_DEFAULT_TIMEOUT
    kill_mode: str = "control-group"
    kill_signal: int = signal.SIGTERM
    environment: tuple[tuple[str, str], ...] = ()
    fd_store_max: int = 0
    exec_reload: tuple[str, ...] = ()   # unexpanded: $MAINPID is known only when it runs


def load_unit(path: str | Path, **overrides) -> UnitSpec:
    """The [Service] settings of a unit file; ``overrides`` replace fields (a test's shorter
    timeout, say so where you use it)."""
    path = Path(path)
    svc = parse_unit(path.read_text()).get("Service", {})

    def one(key: str, default: str | None = None) -> str | None:
        return svc[key][-1] if key in svc else default

    def span(key: str, default: float | None) -> float | None:
        value = one(key)
        return default if value is None else parse_timespan(value, f"{path.name}: {key}=")

    env: dict[str, str] = {}
    for item in svc.get("Environment", []):
        for assignment in shlex.split(item):
            key, _, value = assignment.partition("=")
            env[key] = value
    # as systemd: EnvironmentFile= settings override Environment= ones
    for item in svc.get("EnvironmentFile", []):
        optional, name = item.startswith("-"), item.lstrip("-")
        try:
            env.update(parse_environment_file(Path(name).read_text()))
        except FileNotFoundError:
            if not optional:
                raise LabError(f"{path.name}: EnvironmentFile={name} does not exist") from None
    if "ExecStart" not in svc:
        raise LabError(f"{path.name}: no ExecStart=")
    argv = shlex.split(one("ExecStart"))
    argv[0] = argv[0].lstrip("-@:+!")
    watchdog = span("WatchdogSec", None) or None
    stop = span("TimeoutStopSec", SYSTEMD_DEFAULT_TIMEOUT)
    unit_type = one("Type", "simple")
    spec = UnitSpec(
        exec_start=tuple(expand_command(argv, env)), type=unit_type,
        # systemd: Type=notify or WatchdogSec= without NotifyAccess= means main
        notify_access=one("NotifyAccess", "main" if unit_type == "notify" or watchdog else "none"),
        watchdog=watchdog, restart=one("Restart", "no"), restart_sec=span("RestartSec", 0.1),
        timeout_start=span("TimeoutStartSec", SYSTEMD_DEFAULT_TIMEOUT), timeout_stop=stop,
        timeout_abort=span("TimeoutAbortSec", stop), kill_mode=one("KillMode", "control-group"),
        kill_signal=signal.Signals[one("KillSignal", "SIGTERM")].value,
        environment=tuple(sorted(env.items())),
        fd_store_max=int(one("FileDescriptorStoreMax", "0")),
        exec_reload=tuple(shlex.split(one("ExecReload", ""))),
    )
    return replace(spec, **overrides)


@dataclass(frozen=True)
class Event:
    t: float  # time.monotonic()
    kind: str  # spawn, notify, ignored, ready, watchdog-timeout, start-timeout, kill, exit, restart, stop
    pid: int
    fields: dict = field(default_factory=dict)


class Supervisor:
    """Runs one unit (``UnitSpec``) in a background thread: start(), then inspect ``events``,
    ``state`` and ``main_pid``; stop() as ``systemctl stop``; close() always.

    ``wrap`` turns the command into what is executed (the lab: enter a namespace and a
    cgroup); it must exec, not fork, so the command keeps the main pid."""

    def __init__(self, spec: UnitSpec, *, wrap: Callable[[list[str]], list[str]] = list,
                 log_path: str | Path | None = None, env: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.wrap = wrap
        self.log_path = Path(log_path) if log_path else None
        self.base_env = {**os.environ, **dict(spec.environment), **(env or {})}
        self._dir = tempfile.mkdtemp(prefix="hm-sup-")
        self.socket_path = os.path.join(self._dir, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind(self.socket_path)
        self._cond = threading.Condition()
        self.events: list[Event] = []
        self.state = "inactive"  # activating, active, deactivating, auto-restart, failed, inactive
        self.result = ""  # why it failed: exit-code, signal, timeout, watchdog
        self.restarts = 0
        self.main_pid: int | None = None
        self._proc: subprocess.Popen | None = None
        self._deadlines: dict[str, float] = {}
        self._stop_requested = False
        self._closing = False
        # FDSTORE=1: (name, fd) kept across restarts while the unit is not inactive/failed
        self.fd_store: list[tuple[str, int]] = []
        self._keep_store = False
        self._env: dict[str, str] = {}
        self._pgid = 0
        self._former: list = []   # earlier main processes (before MAINPID=), not yet exited
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        with self._cond:
            self._spawn()
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """``systemctl stop``: KillSignal to the main process, SIGKILL after TimeoutStopSec; no restart."""
        with self._cond:
            self._stop_requested = True
            self._deadlines.pop("restart", None)
            if self._proc is not None and self.state not in ("deactivating",):
                self._record("stop", self.main_pid or 0)
                self._terminate(self.spec.kill_signal, self.spec.timeout_stop, "stop")
            elif self._proc is None:
                self.state = "inactive"
            self._cond.notify_all()
        self.wait(lambda _: self._proc is None, timeout or (self.spec.timeout_stop or 90) + 10, "the unit to stop")

    def restart(self, timeout: float | None = None) -> None:
        """``systemctl restart``: stop, then start; the file descriptor store is kept (a job
        is queued for the unit, so systemd does not flush it)."""
        with self._cond:
            self._keep_store = True
        try:
            self.stop(timeout)
        finally:
            with self._cond:
                self._keep_store = False
                self._stop_requested = False
                self._record("restart", 0, {"n": self.restarts, "why": "requested"})
                self._spawn()

    def reload(self, timeout: float = 90) -> None:
        """``systemctl reload``: run ExecReload= ($MAINPID expanded); with Type=notify the unit
        is "reloading" from RELOADING=1 until READY=1 from the main process (which may have
        changed meanwhile: MAINPID=)."""
        if not self.spec.exec_reload:
            raise LabError("the unit has no ExecReload=")
        # a main process that is not our child (MAINPID=) is reparented to us when its parent
        # exits, as it would be to systemd: we can then wait for it
        _set_child_subreaper()
        with self._cond:
            argv = expand_command(list(self.spec.exec_reload), {**self._env, "MAINPID": str(self.main_pid)})
            self._record("reload", self.main_pid or 0, {"argv": argv})
            reloads = len(self.of_locked("reload"))
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise LabError(f"ExecReload= failed ({r.returncode}): {r.stderr.strip()}")
        self.wait(lambda ev: self.state == "active" and len([e for e in ev if e.kind == "reloaded"]) >= reloads,
                  timeout, "the reload to finish (READY=1)")

    def of_locked(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    def close(self) -> None:
        """Stop (if running), end the thread, remove the socket. Safe to call twice."""
        if self._closing:
            return
        try:
            if self._thread.is_alive():
                self.stop()
        except LabError:
            pass  # did not stop in time: the process group is killed below
        finally:
            self._closing = True
            with self._cond:
                self._cond.notify_all()
            if self._thread.is_alive():
                self._thread.join(timeout=5)
            if self._proc is not None:  # the thread never ran, or gave up: do not leave a process behind
                self._kill_group(signal.SIGKILL)
            self._sock.close()
            self._flush_store()
            shutil.rmtree(self._dir, ignore_errors=True)

    def wait(self, pred: Callable[[list[Event]], object], timeout: float, what: str):
        """Until ``pred(events)`` is truthy (returns it); LabError naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = pred(self.events)
                if got:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LabError(f"supervisor: timed out after {timeout:g}s waiting for {what}; state "
                                   f"{self.state}, last events: {[(e.kind, e.fields) for e in self.events[-5:]]}")
                self._cond.wait(min(left, 0.1))

    def of(self, kind: str) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.kind == kind]

    def statuses(self) -> list[str]:
        return [e.fields["STATUS"] for e in self.of("notify") if "STATUS" in e.fields]

    # ------------------------------------------------------------------ the thread
    def _record(self, kind: str, pid: int, fields: dict | None = None) -> None:
        self.events.append(Event(time.monotonic(), kind, pid, fields or {}))
        self._cond.notify_all()

    def _spawn(self) -> None:
        env = dict(self.base_env)
        env["NOTIFY_SOCKET"] = self.socket_path if self.spec.notify_access != "none" else ""
        if not env["NOTIFY_SOCKET"]:
            env.pop("NOTIFY_SOCKET")
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        argv = list(self.wrap(list(self.spec.exec_start)))
        pass_fds: tuple[int, ...] = ()
        if self.fd_store:
            # systemd passes the store from fd 3 on, with LISTEN_PID = the exec'd process;
            # the launcher puts them there and execs, keeping the pid
            pass_fds = tuple(fd for _, fd in self.fd_store)
            argv = [sys.executable, "-m", "meshlab.supervisor", "exec", "--fds", ",".join(map(str, pass_fds)),
                    "--names", ":".join(n for n, _ in self.fd_store), "--", *argv]
        if self.spec.watchdog:
            env["WATCHDOG_USEC"] = str(int(self.spec.watchdog * 1_000_000))
            # systemd sets WATCHDOG_PID to the pid it forked; here the shell that execs the
            # command has that pid, and exec keeps it
            argv = ["/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "hostmesh-supervisor",
                    *argv]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                          start_new_session=True, close_fds=True, pass_fds=pass_fds)
        finally:
            if self.log_path:
                out.close()
        self.main_pid = self._proc.pid
        self._pgid = self._proc.pid   # start_new_session: the group a later main process stays in
        self._env = env
        self.state = "activating" if self.spec.type == "notify" else "active"
        self._deadlines = {}
        if self.spec.type == "notify" and self.spec.timeout_start:
            self._deadlines["start"] = time.monotonic() + self.spec.timeout_start
        self._record("spawn", self.main_pid, {"argv": argv})

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closing and self._proc is None:
                    return
                wake = min([0.05, *(d - time.monotonic() for d in self._deadlines.values())])
            ready, _, _ = select.select([self._sock], [], [], max(wake, 0))
            with self._cond:
                if ready:
                    self._receive()
                self._check_exit()
                self._check_deadlines()
                if self._closing and self._proc is None:
                    return

    def _receive(self) -> None:
        try:
            data, anc, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(MAX_FDS * 4),
                                                 socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        pid = next((struct.unpack("3i", d[:12])[0] for level, kind, d in anc
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), 0)
        fds = [fd for level, kind, d in anc if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
               for fd in array.array("i", d[:len(d) - len(d) % 4])]
        from nodeagent.sdnotify import parse_message
        fields = parse_message(data)
        if self.spec.notify_access == "main" and pid != self.main_pid:
            self._record("ignored", pid, fields)  # systemd: "reception only permitted for main PID"
            for fd in fds:
                os.close(fd)
            return
        self._record("notify", pid, fields)
        self._fd_store_message(fields, fds)
        if fields.get("MAINPID", "").isdigit() and int(fields["MAINPID"]) != self.main_pid:
            self._adopt_main(int(fields["MAINPID"]))
        if fields.get("RELOADING") == "1" and self.state == "active":
            self.state = "reloading"
        if fields.get("READY") == "1" and self.state == "reloading":
            self.state = "active"
            self._record("reloaded", pid, fields)
        if fields.get("READY") == "1" and self.state == "activating":
            self.state = "active"
            self._deadlines.pop("start", None)
            self._record("ready", pid, fields)
            if self.spec.watchdog:  # armed when start-up completes
                self._deadlines["watchdog"] = time.monotonic() + self.spec.watchdog
        if fields.get("WATCHDOG") == "1" and self.spec.watchdog and "watchdog" in self._deadlines:
            self._deadlines["watchdog"] = time.monotonic() + self.spec.watchdog
        if fields.get("STOPPING") == "1" and self.state in ("activating", "active"):
            self.state = "deactivating"
            self._deadlines.pop("watchdog", None)

    def _adopt_main(self, pid: int) -> None:
        """MAINPID=: another process (a child of the main one, in the unit) is the main process."""
        if not os.path.exists(f"/proc/{pid}"):
            self._record("ignored", pid, {"MAINPID": str(pid), "why": "no such process"})
            return
        old = self.main_pid
        self.main_pid = pid
        if self._proc is not None:
            self._former.append(self._proc)   # still draining; reaped when it exits
        self._proc = _AdoptedProcess(pid)
        self._record("mainpid", pid, {"from": old})

    def _fd_store_message(self, fields: dict, fds: list[int]) -> None:
        """FDSTORE=1 keeps the descriptors (at most FileDescriptorStoreMax, one copy of each
        open file, as systemd does); FDSTOREREMOVE=1 drops those named FDNAME."""
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTOREREMOVE") == "1":
            for n, fd in [e for e in self.fd_store if e[0] == name]:
                os.close(fd)
            self.fd_store = [e for e in self.fd_store if e[0] != name]
        for fd in fds:
            st = os.fstat(fd)
            duplicate = any((o := os.fstat(old)).st_dev == st.st_dev and o.st_ino == st.st_ino
                            for _, old in self.fd_store)
            if fields.get("FDSTORE") != "1" or duplicate or len(self.fd_store) >= self.spec.fd_store_max:
                os.close(fd)
                continue
            self.fd_store.append((name, fd))
            self._record("fdstore", self.main_pid or 0, {"name": name})

    def _flush_store(self) -> None:
        for _, fd in self.fd_store:
            os.close(fd)
        self.fd_store = []

    def _terminate(self, sig: int, timeout: float | None, why: str) -> None:
        """sig (+ SIGCONT) to the main process (KillMode=mixed/process) or the group; SIGKILL later."""
        self.state = "deactivating"
        self._deadlines.pop("watchdog", None)
        self._deadlines.pop("start", None)
        target = "main" if self.spec.kill_mode in ("mixed", "process") else "group"
        for s in (sig, signal.SIGCONT):
            try:
                if target == "main":
                    os.kill(self.main_pid, s)
                else:
                    os.killpg(self._pgid or self.main_pid, s)
            except ProcessLookupError:
                pass
        self._record("kill", self.main_pid, {"signal": signal.Signals(sig).name, "why": why, "to": target})
        if timeout is not None:
            self._deadlines["kill"] = time.monotonic() + timeout

    def _kill_group(self, sig: int) -> None:
        try:
            os.killpg(self._pgid or self.main_pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        if self._deadlines.get("start", now + 1) <= now:
            self.result = "timeout"
            self._record("start-timeout", self.main_pid)
            self._terminate(self.spec.kill_signal, self.spec.timeout_stop, "start timeout")
        if self._deadlines.get("watchdog", now + 1) <= now:
            self.result = "watchdog"
            self._record("watchdog-timeout", self.main_pid, {"watchdog_sec": self.spec.watchdog})
            self._terminate(signal.SIGABRT, self.spec.timeout_abort, "watchdog")
        if self._deadlines.get("kill", now + 1) <= now:
            self._deadlines.pop("kill")
            self._kill_group(signal.SIGKILL)
            self._record("kill", self.main_pid, {"signal": "SIGKILL", "why": "timeout", "to": "group"})
        if self._deadlines.get("restart", now + 1) <= now:
            self._deadlines.pop("restart")
            self.restarts += 1
            self._record("restart", 0, {"n": self.restarts})
            self._spawn()

    def _check_exit(self) -> None:
        for former in list(self._former):
            if former.poll() is not None:
                self._former.remove(former)
                self._record("exit-former", former.pid, {"returncode": former.returncode})
        if self._proc is None or self._proc.poll() is None:
            return
        rc = self._proc.returncode
        pid = self.main_pid
        # KillMode=mixed / control-group: what is left of the unit goes with its main process
        self._kill_group(signal.SIGKILL)
        self._proc = None
        self._deadlines.pop("kill", None)
        clean = rc == 0 or (rc < 0 and -rc in CLEAN_SIGNALS)
        if not self.result:
            self.result = "" if clean else ("signal" if rc < 0 else "exit-code")
        self._record("exit", pid, {"returncode": rc, "signal": signal.Signals(-rc).name if rc < 0 else None,
                                   "result": self.result or "success"})
        failed = bool(self.result)
        if failed and self.spec.restart in ("on-failure", "always") and not self._stop_requested:
            self.state = "auto-restart"
            self._deadlines = {"restart": time.monotonic() + self.spec.restart_sec}
        elif self.spec.restart == "always" and not self._stop_requested:
            self.state = "auto-restart"
            self._deadlines = {"restart": time.monotonic() + self.spec.restart_sec}
        else:
            self.state = "failed" if failed else "inactive"
            if not self._keep_store:  # inactive or failed with no job queued: systemd flushes the store
                self._flush_store()
        self.result = ""


class _AdoptedProcess:
    """A main process the supervisor did not start (MAINPID=): polled like a Popen. It is
    waited for once it has been reparented to us (child subreaper); before that its parent
    reaps it, and an exit seen only as a vanished /proc entry counts as a failure."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        try:
            got, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            if not os.path.exists(f"/proc/{self.pid}"):
                self.returncode = 255
            return self.returncode
        if got == 0:
            return None
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _set_child_subreaper() -> None:
    import ctypes
    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def exec_with_fds(argv: list[str]) -> int:
    """``exec --fds 7,9 --names a:b -- CMD...``: move the descriptors to 3, 4, ..., set
    LISTEN_FDS / LISTEN_FDNAMES / LISTEN_PID (this pid, which exec keeps) and exec CMD."""
    p = argparse.ArgumentParser(prog="python -m meshlab.supervisor exec")
    p.add_argument("--fds", required=True)
    p.add_argument("--names", required=True)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    fds = [int(x) for x in args.fds.split(",")]
    import fcntl
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000) for fd in fds]   # out of the way first
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)          # dup2 makes the target inheritable
        os.close(fd)
    os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=args.names, LISTEN_PID=str(os.getpid()))
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    os.execvp(cmd[0], cmd)
    return 127


def main(argv: list[str] | None = None) -> int:
    """Run a unit in the foreground and print its events as JSON lines (Ctrl-C stops it)."""
    p = argparse.ArgumentParser(prog="python -m meshlab.supervisor", description=__doc__.splitlines()[0])
    p.add_argument("unit", help="a .service file")
    p.add_argument("--log", help="where the service's stdout and stderr go")
    args = p.parse_args(argv)
    sup = Supervisor(load_unit(args.unit), log_path=args.log)
    sup.start()
    seen = 0
    try:
        while True:
            time.sleep(0.1)
            events = sup.events[seen:]
            seen += len(events)
            for e in events:
                print(json.dumps({"t": round(e.t, 3), "kind": e.kind, "pid": e.pid, **e.fields}), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        sup.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["exec"]:
        sys.exit(exec_with_fds(sys.argv[2:]))
    sys.exit(main())
