"""Run a command, or a piece of Python, inside a named network namespace.

`netns=None` everywhere means "the namespace this process is already in" (the agent's normal
case: it runs in the node's namespace). A name means the namespace bind-mounted at
`/run/netns/<name>` by `ip netns add`, which is how tests and lab tooling point a capture
backend at a node.

Two mechanisms, both leaving the calling thread untouched:

* `run()` executes a program in the namespace through `nsenter --net=...` (falling back to
  `ip netns exec`). Only the network namespace is entered: no mount-namespace games, so the
  program sees the host's files and the same binaries.
* `call_in()` / `socket_in()` run Python in a short-lived thread that `setns()`s itself into
  the namespace. A socket created there belongs to that namespace for its whole life, even
  when used from other threads afterwards, so tests can listen and connect "from inside" a
  pod or node without spawning processes. The thread exits right after, so no thread of
  this process is ever left in a foreign namespace.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import threading
from typing import Any, Callable, Sequence, TypeVar

from nodeagent.errors import CaptureError

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


def netns_path(name: str) -> str:
    """The bind-mount path of a named namespace; rejects names that are not plain names."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise CaptureError(f"netns: {name!r} is not a valid network namespace name")
    path = os.path.join(NETNS_DIR, name)
    if not os.path.exists(path):
        raise CaptureError(f"netns: network namespace {name!r} does not exist ({path} is missing)")
    return path


def wrap(argv: Sequence[str], netns: str | None) -> list[str]:
    """`argv` as a command line that runs inside `netns` (unchanged when netns is None)."""
    if netns is None:
        return list(argv)
    path = netns_path(netns)
    nsenter = shutil.which("nsenter")
    if nsenter:
        return [nsenter, f"--net={path}", "--", *argv]
    ip = shutil.which("ip")
    if ip:
        return [ip, "netns", "exec", netns, *argv]
    raise CaptureError("netns: neither nsenter (util-linux) nor ip (iproute2) is installed; "
                       "cannot enter a named network namespace")


def run(argv: Sequence[str], *, netns: str | None = None, input: str | None = None,
        timeout: float = 30.0, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `argv` (in `netns` if given) and capture its output as text.

    With check=True a non-zero exit raises CaptureError carrying the command and its stderr.
    """
    cmd = wrap(argv, netns)
    try:
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "LC_ALL": "C"})
    except FileNotFoundError as exc:
        raise CaptureError(f"{argv[0]}: not found ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise CaptureError(f"{' '.join(argv)}: timed out after {timeout:g}s") from exc
    if check and proc.returncode != 0:
        where = f" in netns {netns}" if netns else ""
        raise CaptureError(f"{' '.join(argv)}{where} failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def call_in(netns: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call fn(*args, **kwargs) with the calling thread's network namespace set to `netns`.

    Runs in a fresh thread (setns affects only the calling thread); the result is returned
    and an exception is re-raised in the caller. netns=None calls fn directly.
    """
    if netns is None:
        return fn(*args, **kwargs)
    path = netns_path(netns)
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=body, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def socket_in(netns: str | None, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
              proto: int = 0) -> socket.socket:
    """A new socket that lives in `netns` (usable from any thread afterwards)."""
    return call_in(netns, socket.socket, family, type, proto)
