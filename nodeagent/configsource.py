"""Where the agent's snapshot comes from until the control-plane client lands: a JSON file.

The file is polled (cheap: one stat per interval). A valid change is applied atomically
to `AgentState`; an invalid one keeps the last good snapshot in force, is logged and
counted, and shows on /ready's reason only while no good snapshot exists at all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Callable

from nodeagent.errors import ConfigError
from nodeagent.state import AgentState, NodeSnapshot

log = logging.getLogger(__name__)


class SnapshotFile:
    def __init__(self, path: str, node: str, state: AgentState,
                 on_error: Callable[[str], None] = lambda msg: None, interval: float = 0.5) -> None:
        self.path = path
        self.node = node
        self.state = state
        self.interval = interval
        self.on_error = on_error
        self.last_error = ""
        self._seen: tuple[int, int, int] | None = None

    def load(self) -> NodeSnapshot:
        """Read and validate the file; raises ConfigError naming the file and field."""
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{self.path}: snapshot file does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{self.path}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}") from None
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read: {exc.strerror}") from None
        snap = NodeSnapshot.from_dict(data, source=self.path)
        if snap.node != self.node:
            raise ConfigError(f"{self.path}: node: snapshot is for {snap.node!r}, this agent is {self.node!r}")
        return snap

    def poll(self) -> bool:
        """Apply the file if it changed since the last look; True when a new snapshot was applied."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._seen:
            return False
        self._seen = key
        try:
            snap = self.load()
        except ConfigError as exc:
            self.last_error = str(exc)
            log.error("snapshot rejected; keeping the last good one", extra={"error": str(exc)})
            self.on_error(str(exc))
            return False
        self.last_error = ""
        current = self.state.snapshot
        if current is not None and current.version == snap.version:
            return False
        self.state.apply(snap)
        log.info("snapshot applied", extra={"version": snap.version, "services": len(snap.services),
                                             "workloads": len(snap.workloads)})
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.poll()
