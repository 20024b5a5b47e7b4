"""One agent per state directory: an flock the running agent holds for its whole life.

`hostmesh agent --uninstall` takes the same lock, so it refuses to remove capture under a
running agent. A lock, not a pid file: the kernel releases it when the holder dies (even
by SIGKILL), so a crashed agent never blocks its successor or an uninstall, and a pid
reused by another process cannot fool it. The holder's pid is written into the file only
to make the refusal message useful.
"""

from __future__ import annotations

import fcntl
import os

from nodeagent.errors import AgentError

LOCK_NAME = "agent.lock"


class AgentRunning(AgentError):
    """Another agent holds the state directory's lock."""


class InstanceLock:
    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self, what: str) -> None:
        """Take the lock or raise AgentRunning naming the holder; ``what`` says who asks."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AgentRunning(f"{what}: an agent is running with state directory {os.path.dirname(self.path)} "
                               f"(pid {holder}); stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
