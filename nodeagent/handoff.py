"""Listener hand-off between two agents on one node: a restart or an upgrade that refuses
no connection and never leaves capture without a proxy behind it.

The running agent (the *predecessor*) serves a unix socket, ``<stateDir>/handoff.sock``
(0600, in the state directory only root can enter). An agent started while the
predecessor holds the state directory's lock (the *successor*) connects to it instead of
giving up, and the two follow this exchange, one JSON object per line; the LISTENERS
line carries the listening sockets as SCM_RIGHTS, as Envoy's hot restart does:

    successor                                   predecessor
    HELLO  node, build, pid, listener addresses, capture
                                                WELCOME generation, counters  |  REFUSE why
    (gets a snapshot and its certificates ready, up to handoff.timeout)
    TAKE
                                                LISTENERS names + the sockets
    (accepts on them; for a moment both do)
    SERVING
                                                (stops accepting, stops its control loops,
                                                 releases the lock)
                                                RELEASED
                                                (drains for drainGrace, exits)
    (takes the lock, adopts capture, is LIVE)

The sockets are the same kernel sockets, so nothing is ever unbound: connections that
arrive during the exchange wait in the shared accept queue, the eBPF backend's sockmap
entry stays valid, and iptables REDIRECT keeps finding a listener. Before SERVING the
successor may send ABORT (or just die): the predecessor carries on as if nothing had
happened. A hand-off needs the same node, listener addresses and capture backend; any
other change is refused with the reason (stop the running agent instead: capture stays).

This module holds the protocol (messages, the compatibility check: no I/O) and both
ends over blocking sockets; the agent runs them in threads.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
from dataclasses import dataclass, field
from typing import Callable

from nodeagent.errors import AgentError

log = logging.getLogger("hostmesh.handoff")

SOCKET_NAME = "handoff.sock"
MAX_LINE = 64 * 1024
# the listeners a hand-off passes, in order; "tunnel" only when the agent has certificates
LISTENER_NAMES = ("outbound", "inbound", "tunnel", "admin", "health")


class HandoffError(AgentError):
    """The hand-off could not happen; the message says why, for the operator."""


class HandoffRefused(HandoffError):
    """The predecessor said no (an incompatible successor): nothing was changed."""


# ------------------------------------------------------------------ the protocol (no I/O)

@dataclass(frozen=True)
class Offer:
    """What a predecessor is: checked against a successor's HELLO."""

    node: str
    build: str
    pid: int
    generation: int
    listeners: dict[str, str]  # name -> "host:port"
    capture: dict[str, str]  # {"mode": ..., "instance": ...}
    counters: dict[str, int] = field(default_factory=dict)  # carried across generations

    def welcome(self) -> dict:
        return {"type": "WELCOME", "node": self.node, "build": self.build, "pid": self.pid,
                "generation": self.generation, "counters": dict(self.counters)}


@dataclass(frozen=True)
class Hello:
    """What a successor is."""

    node: str
    build: str
    pid: int
    listeners: dict[str, str]
    capture: dict[str, str]

    def message(self) -> dict:
        return {"type": "HELLO", "node": self.node, "build": self.build, "pid": self.pid,
                "listeners": dict(self.listeners), "capture": dict(self.capture)}

    @classmethod
    def parse(cls, msg: dict) -> "Hello":
        try:
            hello = cls(node=msg["node"], build=msg["build"], pid=msg["pid"], listeners=msg["listeners"],
                        capture=msg["capture"])
        except (KeyError, TypeError):
            raise HandoffError("malformed HELLO") from None
        if not (isinstance(hello.node, str) and isinstance(hello.build, str) and isinstance(hello.pid, int)
                and _str_map(hello.listeners) and _str_map(hello.capture)):
            raise HandoffError("malformed HELLO")
        return hello


def _str_map(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def incompatibility(offer: Offer, hello: Hello) -> str:
    """Why ``hello``'s agent cannot take over from ``offer``'s ('' when it can)."""
    if hello.node != offer.node:
        return f"the running agent serves node {offer.node!r}, the new one is for node {hello.node!r}"
    for name in sorted(set(offer.listeners) | set(hello.listeners)):
        have, want = offer.listeners.get(name), hello.listeners.get(name)
        if have != want:
            return (f"the {name} listener would change ({have or 'none'} -> {want or 'none'}): a hand-off passes "
                    "the same sockets; stop the running agent first (capture stays installed)")
    for key in sorted(set(offer.capture) | set(hello.capture)):
        have, want = offer.capture.get(key), hello.capture.get(key)
        if have != want:
            return (f"capture {key} would change ({have} -> {want}): a hand-off keeps the installed capture; "
                    "stop the running agent and run `hostmesh agent --uninstall` with its config first")
    return ""


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes, expect: str) -> dict:
    """One protocol line of type ``expect`` (REFUSE and ABORT are always allowed: they raise)."""
    try:
        msg = json.loads(line)
    except ValueError:
        raise HandoffError("the other agent sent a malformed message") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise HandoffError("the other agent sent a malformed message")
    kind = msg["type"]
    if kind == "REFUSE":
        raise HandoffRefused(str(msg.get("error", "refused")))
    if kind == "ABORT":
        raise HandoffError(f"the new agent gave up: {msg.get('error', 'no reason given')}")
    if kind != expect:
        raise HandoffError(f"expected {expect} from the other agent, got {kind}")
    return msg


# ------------------------------------------------------------------ framing over a unix socket

class _Channel:
    """Line framing (and SCM_RIGHTS) over one connected, blocking AF_UNIX stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self.fds: list[int] = []  # received with the line last read

    def send(self, msg: dict, fds: list[int] = ()) -> None:
        data = encode(msg)
        if fds:
            sent = socket.send_fds(self.sock, [data], list(fds))
            data = data[sent:]
        if data:
            self.sock.sendall(data)

    def recv(self, expect: str) -> dict:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise HandoffError("the other agent sent an over-long message")
            data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_LINE, 16)
            self.fds.extend(fds)
            if not data:
                raise HandoffError("the other agent closed the hand-off connection")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return decode(line, expect)

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def _wire_name_ok(name: str) -> bool:
    base, sep, index = name.partition("#")
    return base in LISTENER_NAMES and (not sep or (index.isdigit() and int(index) > 0
                                                    and base not in ("admin", "health")))


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


# ------------------------------------------------------------------ the successor's end

@dataclass
class Predecessor:
    """What the successor learned: who it takes over from."""

    node: str
    build: str
    pid: int
    generation: int
    counters: dict[str, int]


class HandoffClient:
    """The successor's end: ``connect`` (HELLO/WELCOME), ``take`` (the sockets), ``serving``
    (the predecessor stops accepting and releases the lock), or ``abort``. Blocking."""

    def __init__(self, state_dir: str, timeout: float = 10.0) -> None:
        self.path = socket_path(state_dir)
        self.timeout = timeout
        self._chan: _Channel | None = None

    @staticmethod
    def available(state_dir: str) -> bool:
        try:
            return stat.S_ISSOCK(os.stat(socket_path(state_dir)).st_mode)
        except OSError:
            return False

    def connect(self, hello: Hello) -> Predecessor:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise HandoffError(f"cannot reach the running agent at {self.path}: {exc.strerror or exc}") from None
        self._chan = _Channel(sock)
        try:
            self._chan.send(hello.message())
            msg = self._chan.recv("WELCOME")
            counters = msg.get("counters") if isinstance(msg.get("counters"), dict) else {}
            return Predecessor(node=str(msg.get("node")), build=str(msg.get("build")), pid=int(msg.get("pid", 0)),
                               generation=int(msg.get("generation", 0)),
                               counters={k: int(v) for k, v in counters.items() if isinstance(v, int)})
        except (OSError, ValueError, TypeError) as exc:
            self.close()
            raise HandoffError(f"hand-off with the running agent failed: {exc}") from None
        except HandoffError:
            self.close()
            raise

    def take(self) -> dict[str, socket.socket]:
        """The predecessor's listening sockets, by wire name (``grouped`` gives them per listener)."""
        chan = self._require()
        try:
            chan.send({"type": "TAKE"})
            msg = chan.recv("LISTENERS")
            names = msg.get("names")
            if not isinstance(names, list) or len(names) != len(chan.fds) or len(set(names)) != len(names) \
                    or not all(isinstance(n, str) and _wire_name_ok(n) for n in names):
                raise HandoffError("the running agent sent listeners that do not match their names")
            out = {}
            for name, fd in zip(names, chan.fds):
                s = socket.socket(fileno=fd)
                s.setblocking(False)
                out[name] = s
            chan.fds = []
            return out
        except OSError as exc:
            chan.close_fds()
            raise HandoffError(f"receiving the listeners failed: {exc.strerror or exc}") from None
        except HandoffError:
            chan.close_fds()
            raise

    def serving(self, timeout: float = 30.0) -> None:
        """Say we accept now; returns once the predecessor stopped accepting and released the lock."""
        chan = self._require()
        try:
            chan.sock.settimeout(timeout)
            chan.send({"type": "SERVING"})
            chan.recv("RELEASED")
        except OSError as exc:
            raise HandoffError(f"the running agent did not confirm the hand-off: {exc.strerror or exc}") from None
        finally:
            self.close()

    def abort(self, why: str) -> None:
        if self._chan is None:
            return
        try:
            self._chan.send({"type": "ABORT", "error": why})
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self._chan is not None:
            self._chan.close_fds()
            self._chan.sock.close()
            self._chan = None

    def _require(self) -> _Channel:
        if self._chan is None:
            raise HandoffError("not connected to the running agent")
        return self._chan


# ------------------------------------------------------------------ the predecessor's end

@dataclass
class HandoffHooks:
    """How the hand-off server reaches the agent (called from its thread)."""

    offer: Callable[[], Offer]
    # the listening sockets' fds by name, at TAKE time
    listener_fds: Callable[[], dict[str, int]]
    # after SERVING: stop accepting, stop the control loops, release the lock; blocks until done
    release: Callable[[Hello], None]
    # every outcome, for the metrics: "given", "refused", "aborted"
    outcome: Callable[[str, str], None] = lambda result, why: None


class HandoffServer:
    """The predecessor's end: one successor at a time, in a thread; ``close`` stops it."""

    def __init__(self, state_dir: str, hooks: HandoffHooks, *, take_timeout: float = 120.0,
                 step_timeout: float = 30.0) -> None:
        self.path = socket_path(state_dir)
        self.hooks = hooks
        self.take_timeout = take_timeout  # the successor readies its config before TAKE
        self.step_timeout = step_timeout
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self.handed_off = threading.Event()

    def start(self) -> None:
        """Bind the socket (replacing a stale one: we hold the state directory's lock)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            sock.bind(self.path)
        except OSError as exc:
            sock.close()
            raise HandoffError(f"cannot serve hand-offs at {self.path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old_umask)
        sock.listen(4)
        sock.settimeout(0.5)  # accept() wakes to see close()
        self._sock = sock
        self._ino = os.stat(self.path).st_ino
        self._thread = threading.Thread(target=self._serve, name="handoff", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and remove the socket file (only if it is still ours)."""
        self._closed.set()
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's accept()
        except OSError:
            pass
        sock.close()
        try:
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except OSError:
            pass
        # the thread notices within its accept timeout; an exchange in progress ends at its
        # next step. Joined briefly only: close() runs on the event loop that an exchange's
        # release step may be waiting for.
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

    def _serve(self) -> None:
        while not self._closed.is_set():
            sock = self._sock
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            try:
                if self._one(conn):
                    return  # handed off: nobody else may take what is gone
            finally:
                conn.close()

    def _one(self, conn: socket.socket) -> bool:
        """Serve one successor; True once it took over."""
        conn.settimeout(self.step_timeout)
        chan = _Channel(conn)
        hello: Hello | None = None
        try:
            hello = Hello.parse(chan.recv("HELLO"))
            offer = self.hooks.offer()
            why = incompatibility(offer, hello)
            if why:
                chan.send({"type": "REFUSE", "error": why})
                log.warning("refused a hand-off", extra={"successor_pid": hello.pid, "error": why})
                self.hooks.outcome("refused", why)
                return False
            chan.send(offer.welcome())
            log.info("a new agent is taking over", extra={"successor_pid": hello.pid, "build": hello.build})
            conn.settimeout(self.take_timeout)
            chan.recv("TAKE")
            conn.settimeout(self.step_timeout)
            fds = self.hooks.listener_fds()
            names = list(fds)
            chan.send({"type": "LISTENERS", "names": names}, [fds[n] for n in names])
            chan.recv("SERVING")
            self.hooks.release(hello)
            self.handed_off.set()
            try:
                chan.send({"type": "RELEASED"})
            except OSError:
                pass  # it has what it needs; the lock tells it the rest
            self.hooks.outcome("given", "")
            log.info("handed off to the new agent", extra={"successor_pid": hello.pid})
            return True
        except (HandoffError, OSError, ValueError) as exc:
            why = str(exc) if isinstance(exc, HandoffError) else (getattr(exc, "strerror", None) or str(exc)
                                                                   or type(exc).__name__)
            log.warning("hand-off abandoned; this agent keeps serving",
                        extra={"successor_pid": hello.pid if hello else None, "error": why})
            self.hooks.outcome("aborted", why)
            return False
        finally:
            chan.close_fds()


def fds_of(sockets: dict[str, "socket.socket | list[socket.socket] | None"]) -> dict[str, int]:
    """Wire names -> fds: a listener's several sockets (SO_REUSEPORT, one per worker) are
    ``name``, ``name#1``, ``name#2``..."""
    out = {}
    for name, socks in sockets.items():
        if socks is None:
            continue
        for i, s in enumerate(socks if isinstance(socks, list) else [socks]):
            if s.fileno() >= 0:
                out[name if i == 0 else f"{name}#{i}"] = s.fileno()
    return out


def stored_socket_mismatch(sock: socket.socket, want: str | None) -> str:
    """Why a socket kept by the service manager cannot serve a listener configured as
    ``want`` ("host:port", port 0 = any); '' when it can."""
    if want is None:
        return "no such listener in this bootstrap"
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM \
                or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "not a listening TCP socket"
        host, port = sock.getsockname()[:2]
    except OSError as exc:
        return f"not a usable socket ({exc.strerror or exc})"
    want_host, _, want_port = want.rpartition(":")
    if host != want_host or (int(want_port) and port != int(want_port)):
        return f"listens on {host}:{port}, the bootstrap wants {want}"
    return ""


def grouped(received: dict[str, socket.socket]) -> dict[str, list[socket.socket]]:
    """The inverse of ``fds_of`` on received sockets: listener name -> its sockets."""
    out: dict[str, list[socket.socket]] = {}
    for name in sorted(received, key=lambda n: (n.partition("#")[0], int(n.partition("#")[2] or 0))):
        out.setdefault(name.partition("#")[0], []).append(received[name])
    return out


__all__ = ["HandoffClient", "HandoffError", "HandoffHooks", "HandoffRefused", "HandoffServer", "Hello", "Offer",
           "Predecessor", "decode", "encode", "grouped", "incompatibility", "socket_path", "fds_of",
           "stored_socket_mismatch"]
