"""The sd_notify protocol (what systemd's ``Type=notify`` and ``WatchdogSec=`` speak), without libsystemd.

A service manager that wants to hear from its service passes ``$NOTIFY_SOCKET``: the
address of an AF_UNIX datagram socket, a path, or a name in the abstract namespace
written ``@name``. The service sends newline-separated ``KEY=value`` assignments, one
datagram per message:

    READY=1        start-up is finished: the manager considers the service started
    STATUS=...     one line of free text, shown by ``systemctl status``
    STOPPING=1     the service is shutting down on its own (before it exits)
    WATCHDOG=1     keep-alive: the manager kills the service (SIGABRT) when none arrived
                   within ``$WATCHDOG_USEC`` microseconds
    MAINPID=...    another process is the main process from now on
    FDSTORE=1      keep the file descriptors sent with this message (SCM_RIGHTS) under
                   ``FDNAME=``; on the next start of the service they come back as
                   ``$LISTEN_FDS`` (from fd 3), ``$LISTEN_FDNAMES`` and ``$LISTEN_PID``
    FDSTOREREMOVE=1  drop the stored descriptors named ``FDNAME=``

The watchdog concerns one process only: ``$WATCHDOG_PID``, when set, names the process
that must pet, so a child that inherited the environment never keeps a stuck parent
alive. Pets go out at half the interval (sd_watchdog_enabled(3) recommends this), from
the event loop itself (``Watchdog``): a loop that stops running stops the pets, which is
the whole point. Without ``$NOTIFY_SOCKET`` every call is a no-op, so the agent behaves
the same with and without a service manager.

Sending never raises and never blocks: a datagram that cannot go out (the manager is
gone, its queue is full) is dropped, because a service must not fail, or stall its event
loop, for the sake of a status line. The manager identifies the sender by its
credentials (SO_PASSCRED), so messages go from the process that means them.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from typing import Mapping, MutableMapping

log = logging.getLogger("hostmesh.sdnotify")

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"
ENV_LISTEN_PID = "LISTEN_PID"
ENV_LISTEN_FDS = "LISTEN_FDS"
ENV_LISTEN_FDNAMES = "LISTEN_FDNAMES"
LISTEN_FDS_START = 3
# the variables a service consumes: a child must not inherit them (sd_notify's unset_environment)
ENV_NAMES = (ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID)
ENV_LISTEN_NAMES = (ENV_LISTEN_PID, ENV_LISTEN_FDS, ENV_LISTEN_FDNAMES)


class NotifyError(ValueError):
    """$NOTIFY_SOCKET holds something that is not a unix socket address."""


def socket_address(value: str) -> str:
    """``$NOTIFY_SOCKET`` as an AF_UNIX address: a path, or ``@name`` for the abstract namespace."""
    if value.startswith("@"):
        if len(value) < 2:
            raise NotifyError(f"{ENV_SOCKET}={value!r}: an abstract socket needs a name after '@'")
        return "\0" + value[1:]
    if not value.startswith("/"):
        raise NotifyError(f"{ENV_SOCKET}={value!r}: must be an absolute path or @name (abstract namespace)")
    return value


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog timeout in seconds that process ``pid`` must honour, None when it must not pet:
    no (or a malformed) ``$WATCHDOG_USEC``, or ``$WATCHDOG_PID`` naming another process."""
    usec = environ.get(ENV_WATCHDOG_USEC, "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get(ENV_WATCHDOG_PID, "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 1_000_000


def take_listen_fds(environ: MutableMapping[str, str] | None = None, pid: int | None = None) -> dict[str, int]:
    """The descriptors the manager passed this process (sd_listen_fds_with_names): name -> fd.

    Only when ``$LISTEN_PID`` is this process; the variables are removed either way and
    the descriptors made close-on-exec, so nothing this process starts inherits them. A
    name given twice keeps the first; unnamed ones are called ``unknown``, as systemd does."""
    env = os.environ if environ is None else environ
    owner, count, names = (env.pop(k, "") for k in ENV_LISTEN_NAMES)
    if not owner.isdigit() or int(owner) != (os.getpid() if pid is None else pid) or not count.isdigit():
        return {}
    labels = names.split(":") if names else []
    out: dict[str, int] = {}
    for i in range(int(count)):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue
        name = labels[i] if i < len(labels) and labels[i] else "unknown"
        if name in out:
            os.close(fd)
            continue
        out[name] = fd
    return out


def message(**fields: str | int) -> bytes:
    """One datagram: ``KEY=value`` lines. A value is one line: a newline would start another
    assignment, so line breaks in free text (STATUS) become spaces."""
    lines = []
    for key, value in fields.items():
        text = " ".join(str(value).splitlines())
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


def parse_message(data: bytes) -> dict[str, str]:
    """The manager side: a datagram's assignments (malformed lines are ignored, as systemd does)."""
    out: dict[str, str] = {}
    for line in data.decode(errors="replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            out[key] = value
    return out


class Notifier:
    """Talks to the service manager over $NOTIFY_SOCKET; without one, every call does nothing."""

    def __init__(self, address: str | None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog_interval = watchdog if address else None
        self._sock: socket.socket | None = None
        self._status = ""
        self.dropped = 0  # messages that could not be sent (the manager gone, its queue full)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *, pid: int | None = None,
                     unset: bool = False) -> Notifier:
        """From the environment the manager gave this process; ``unset`` removes the variables
        so the processes this one starts (workers, iptables) do not inherit them."""
        env = os.environ if environ is None else environ
        value = env.get(ENV_SOCKET, "")
        interval = watchdog_interval(env, os.getpid() if pid is None else pid)
        if unset:
            for name in ENV_NAMES:
                env.pop(name, None)
        if not value:
            return cls(None)
        try:
            return cls(socket_address(value), interval)
        except NotifyError as exc:
            log.warning("not notifying the service manager", extra={"error": str(exc)})
            return cls(None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one message; False when there is no manager or the datagram could not go out."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # no connect(): a manager that re-created its socket (daemon-reexec) is still reached
            self._sock.sendto(message(**fields), socket.MSG_DONTWAIT, self.address)
            return True
        except OSError as exc:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("cannot notify the service manager", extra={"error": exc.strerror or str(exc),
                                                                        "socket": self.address.replace("\0", "@")})
            return False

    def store_fds(self, name: str, fds: list[int]) -> bool:
        """FDSTORE=1: the manager keeps ``fds`` under ``name`` across a restart or a crash (with
        ``FileDescriptorStoreMax=``; a manager that keeps none drops them, which is harmless)."""
        if self.address is None or not fds:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendmsg([message(FDSTORE=1, FDNAME=name)],
                               [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                               socket.MSG_DONTWAIT, self.address)
            return True
        except OSError as exc:
            self.dropped += 1
            log.warning("cannot store descriptors with the service manager",
                        extra={"error": exc.strerror or str(exc), "name": name})
            return False

    def remove_fds(self, name: str) -> bool:
        return self.send(FDSTOREREMOVE=1, FDNAME=name)

    def ready(self, status: str = "") -> bool:
        self._status = status or self._status
        return self.send(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        """STATUS=text, only when it changed (callers may report the same state repeatedly)."""
        if text == self._status:
            return True
        self._status = text
        return self.send(STATUS=text)

    def stopping(self, status: str = "") -> bool:
        self._status = status or self._status
        return self.send(STOPPING=1, **({"STATUS": status} if status else {}))

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Watchdog:
    """Pets the manager's watchdog from an asyncio loop, at half its interval.

    Each pet is a ``loop.call_later`` callback that schedules the next one, so pets go out
    only while the loop runs callbacks: a loop blocked by a stuck call, or a process that
    is stopped, stops petting and the manager restarts the service."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.period = notifier.watchdog_interval / 2 if notifier.watchdog_interval else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self.pets = 0

    @property
    def active(self) -> bool:
        return self._handle is not None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Pet now and every half interval on ``loop`` (the running one by default)."""
        if self.period is None or self._handle is not None:
            return
        self._loop = loop or asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._pet)

    def _pet(self) -> None:
        self.notifier.watchdog()
        self.pets += 1
        self._handle = self._loop.call_later(self.period, self._pet)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
