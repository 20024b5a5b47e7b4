"""The etcd source: the same objects as the file source, one per key under a prefix.

Key layout: ``<prefix>config/<Kind>/<namespace>/<name>`` (``/hostmesh/config/Service/default/web``),
the value one YAML or JSON document. `hostmesh config apply --etcd` writes them, after
validating the whole set the way the control plane will; nothing invalid is written.

The watch: list the prefix at revision R (one consistent read), then watch from R+1. Each
`WatchResponse` carries all the events of one revision, so a transaction of many objects
is one rebuild. A compacted revision or a broken stream -> list again (the state is
rebuilt from the list, so nothing can be missed); etcd unreachable -> retry with backoff,
the last good model stays in force.

A corrupt value (not YAML, not one valid object, or an object whose kind/namespace/name
differ from its key) is logged with its key, counted and skipped: the rest is served and,
if that key held a valid object before, that object stays in force, so corrupting a
deny policy in etcd cannot silently remove it. Cross-object errors (a route to a Service
that does not exist) reject the whole change, as with files.

`EtcdConfigState` is the part without I/O (fed kvs and events, returns a LoadResult);
`EtcdSource` drives it from a real etcd.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from controlplane.etcd import DEFAULT_PREFIX, Compacted, EtcdClient, EtcdError
from controlplane.model import ConfigIssue, FileResult, LoadResult, MeshModel, MeshObject, assemble, load_file
from controlplane.sources.reporting import ReportingSource

log = logging.getLogger("hostmesh.controlplane.etcd")

BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 10.0


def config_prefix(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix.rstrip('/')}/config/"


def object_key(prefix: str, kind: str, namespace: str, name: str) -> str:
    return f"{config_prefix(prefix)}{kind}/{namespace}/{name}"


def key_of(obj: MeshObject, prefix: str = DEFAULT_PREFIX) -> str:
    return object_key(prefix, obj.kind, obj.namespace, obj.name)


def split_key(prefix: str, key: str) -> tuple[str, str, str] | None:
    """(kind, namespace, name) of a config key, None when it is not one."""
    rest = key[len(config_prefix(prefix)):] if key.startswith(config_prefix(prefix)) else None
    parts = rest.split("/") if rest else []
    if len(parts) != 3 or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


@dataclass(frozen=True)
class _Value:
    mod_revision: int
    data: bytes


def check_value(prefix: str, key: str, data: bytes) -> tuple[FileResult, str]:
    """Parse one key's value; returns (result, "") when it holds exactly one valid object that
    matches its key, else (result, why it is corrupt)."""
    ident = split_key(prefix, key)
    if ident is None:
        return FileResult(key, ()), f"not a config key (want {config_prefix(prefix)}<Kind>/<namespace>/<name>)"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return FileResult(key, ()), f"not valid UTF-8 at byte {exc.start}"
    result = load_file(key, text)
    problems = [str(i) for i in result.issues] + [str(i) for c in result.checked for i in c.issues]
    if problems:
        return result, "; ".join(problems)
    if len(result.checked) != 1:
        return result, f"holds {len(result.checked)} documents (want exactly one object per key)"
    obj = result.checked[0].obj
    if obj is None or obj.key != ident:
        got = f"{obj.kind} {obj.namespace}/{obj.name}" if obj else "nothing"
        return result, f"holds {got}, but its key names {ident[0]} {ident[1]}/{ident[2]}"
    return result, ""


class EtcdConfigState:
    """The keys under the config prefix at one revision, and the model they make."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.revision = 0
        self.corrupt: dict[str, str] = {}           # key -> why it was skipped
        self._values: dict[str, _Value] = {}
        self._parsed: dict[str, tuple[int, FileResult, str]] = {}   # key -> (mod revision, result, why)
        self._good: dict[str, FileResult] = {}       # key -> the last valid object it held

    def reset(self, revision: int, kvs: Iterable) -> None:
        self.revision = revision
        self._values = {kv.key.decode("utf-8", "replace"): _Value(kv.mod_revision, kv.value) for kv in kvs}
        for gone in set(self._good) - set(self._values):
            del self._good[gone]

    def apply(self, revision: int, events: Iterable) -> None:
        """Events of a watch response (etcd's Event: type 0 PUT, 1 DELETE)."""
        self.revision = revision
        for ev in events:
            key = ev.kv.key.decode("utf-8", "replace")
            if ev.type == 1:
                self._values.pop(key, None)
                self._good.pop(key, None)
            else:
                self._values[key] = _Value(ev.kv.mod_revision, ev.kv.value)

    def load(self) -> LoadResult:
        results = []
        corrupt = {}
        parsed = {}
        for key in sorted(self._values):
            v = self._values[key]
            hit = self._parsed.get(key)
            if hit is None or hit[0] != v.mod_revision:
                result, why = check_value(self.prefix, key, v.data)
                hit = (v.mod_revision, result, why)
            parsed[key] = hit
            _, result, why = hit
            if why:
                corrupt[key] = why
                kept = self._good.get(key)
                if kept is not None:
                    results.append(kept)
                continue
            self._good[key] = result
            results.append(result)
        for key, why in corrupt.items():
            if self.corrupt.get(key) != why:
                log.error("corrupt value in etcd skipped", extra={
                    "key": key, "error": why, "kept_previous": key in self._good})
        self._parsed, self.corrupt = parsed, corrupt
        return assemble(results)


def backoff(attempt: int, rand: Callable[[], float] = random.random) -> float:
    return min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** attempt) * (0.5 + rand() / 2)


class EtcdSource(ReportingSource):
    """Follows the config prefix in etcd; callbacks as every source (sources/reporting.py)."""

    kind = "etcd"

    def __init__(self, client: EtcdClient, on_change: Callable[[MeshModel], None],
                 on_error: Callable[[list[ConfigIssue]], None], *, prefix: str = DEFAULT_PREFIX,
                 on_state: Callable[[], None] = lambda: None) -> None:
        super().__init__(on_change, on_error)
        self.client = client
        self.prefix = prefix
        self.state = EtcdConfigState(prefix)
        self.on_state = on_state     # connection or corruption state changed (metrics)
        self.connected = False
        self.last_error = ""
        self.relists = 0
        self._attempt = 0

    def describe(self) -> dict:
        return {"kind": self.kind, "endpoints": list(self.client.endpoints), "prefix": config_prefix(self.prefix),
                "connected": self.connected, "revision": self.state.revision, "relists": self.relists,
                "last_error": self.last_error or None,
                "skipped": [{"key": k, "error": v} for k, v in sorted(self.state.corrupt.items())]}

    async def initial_load(self) -> None:
        """One list at start; when etcd is unreachable, say so and let `run` retry."""
        try:
            await self._list()
        except EtcdError as exc:
            self._unreachable(exc)

    async def run(self) -> None:
        while True:
            try:
                if not self.connected:
                    await self._list()
                async for resp in self.client.watch_prefix(config_prefix(self.prefix), self.state.revision + 1):
                    self.state.apply(resp.header.revision, resp.events)
                    self._report(self.state.load())
                    self.on_state()
            except Compacted as exc:
                log.warning("etcd history compacted under the watch; listing again",
                            extra={"compact_revision": exc.revision})
                self.connected = False
            except EtcdError as exc:
                self._unreachable(exc)
                await asyncio.sleep(backoff(self._attempt))
                self._attempt += 1

    async def _list(self) -> None:
        revision, kvs = await self.client.get_prefix(config_prefix(self.prefix))
        self.state.reset(revision, kvs)
        self.relists += 1
        self.connected, self.last_error, self._attempt = True, "", 0
        self._report(self.state.load())
        self.on_state()

    def _unreachable(self, exc: EtcdError) -> None:
        first = self.connected or not self.last_error
        self.connected, self.last_error = False, str(exc)
        if first:
            log.error("etcd unreachable; serving the last good config and retrying",
                      extra={"error": str(exc), "endpoints": list(self.client.endpoints)})
        self.on_state()
        if self.model is None and not self.errors:
            # nothing loaded yet: make /ready and /debug/config say why
            self.errors = [ConfigIssue(",".join(self.client.endpoints), message=str(exc))]
