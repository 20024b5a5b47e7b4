"""The agent's last applied snapshot on disk, so a restart without a control plane still serves.

File format (JSON, mode 0600):

    {"format": "hostmesh.persisted-snapshot/v1",
     "saved_at": "<iso time>",
     "snapshot": {... NodeSnapshot.to_dict() ...},
     "resource_versions": {"service/default/web": "<version>", ...}}

``resource_versions`` are the control plane's versions of the resources (so the agent's
Hello after a restart declares exactly what it holds and gets only what changed).

Writes are atomic (temporary file in the same directory, fsync, rename, fsync of the
directory). A corrupt or unreadable file is logged and ignored: ``load()`` returns None
and the agent waits for the control plane instead of crashing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nodeagent.errors import ConfigError
from nodeagent.state import NodeSnapshot

log = logging.getLogger("hostmesh.agent.persist")

FORMAT = "hostmesh.persisted-snapshot/v1"


@dataclass(frozen=True)
class Persisted:
    snapshot: NodeSnapshot
    saved_at: str = ""
    resource_versions: dict[str, str] = field(default_factory=dict)


def plain(obj: Any) -> Any:
    """A fast ``dataclasses.asdict`` for the frozen snapshot dataclasses (no deep copies)."""
    if dataclasses.is_dataclass(obj):
        names = _FIELDS.get(type(obj))
        if names is None:
            names = _FIELDS[type(obj)] = tuple(f.name for f in dataclasses.fields(obj))
        return {n: plain(getattr(obj, n)) for n in names}
    if isinstance(obj, (tuple, list)):
        return [plain(x) for x in obj]
    return obj


_FIELDS: dict[type, tuple[str, ...]] = {}


def snapshot_dict(snap: NodeSnapshot) -> dict[str, Any]:
    """The same document as ``NodeSnapshot.to_dict()``, built faster."""
    return {"node": snap.node, "version": snap.version, "services": plain(snap.services),
            "workloads": plain(snap.workloads), "config": plain(snap.config)}


class SnapshotStore:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.last_error = ""

    def save(self, snapshot: NodeSnapshot, resource_versions: dict[str, str] | None = None) -> None:
        """Atomically replace the file with ``snapshot``; raises OSError when it cannot."""
        doc = {
            "format": FORMAT,
            "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "snapshot": snapshot_dict(snapshot),
            "resource_versions": resource_versions or {},
        }
        data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        try:
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass  # some filesystems refuse fsync on directories; the rename is done

    def load(self) -> NodeSnapshot | None:
        rec = self.load_record()
        return rec.snapshot if rec else None

    def load_record(self) -> Persisted | None:
        """The persisted snapshot with its metadata; None when absent, corrupt or unreadable."""
        self.last_error = ""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._bad(f"cannot read: {exc.strerror}")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._bad(f"not valid JSON: {exc}")
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            return self._bad(f"not a persisted snapshot (format is not {FORMAT!r})")
        try:
            data = doc["snapshot"]
            snap = NodeSnapshot.from_dict(data, source=str(self.path))
        except (KeyError, TypeError) as exc:
            return self._bad(f"malformed: {exc}")
        except ConfigError as exc:
            return self._bad(f"invalid snapshot: {exc}")
        version = data.get("version") if isinstance(data, dict) else None
        if isinstance(version, str) and version:
            snap = dataclasses.replace(snap, version=version)
        versions = doc.get("resource_versions")
        if not isinstance(versions, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in versions.items()):
            versions = {}
        saved_at = doc.get("saved_at") if isinstance(doc.get("saved_at"), str) else ""
        return Persisted(snapshot=snap, saved_at=saved_at, resource_versions=versions)

    def _bad(self, why: str) -> None:
        self.last_error = f"{self.path}: {why}"
        log.error("ignoring the persisted snapshot", extra={"path": str(self.path), "error": why})
