"""The file source: a directory of YAML files (multi-document), watched for changes.

`load_directory(path)` reads every `*.yaml` / `*.yml` directly in `path` (not in
subdirectories; names starting with "." - editor swap and lock files - are skipped) in
sorted name order and returns a `LoadResult`. Symlinks are followed, so a Kubernetes
ConfigMap volume (files linked through `..data`) works.

`FileSource` polls a cheap signature of the directory (names, inodes, mtimes, sizes;
one `scandir` per interval). A change is loaded only once the signature has been stable
for one interval (editors that write in place can leave a half-written file for a
moment), and the load is discarded if the signature changed while reading. Files whose
signature is unchanged are not parsed again (per-file cache), so an edit to one file in
a large directory costs one file's parse plus the cross-object checks.

Callbacks: `on_change(model)` after a successful load whose model differs from the last
one reported (or after a failed load: the errors are gone); `on_error(errors)` after a
failed load whose errors differ from the last ones reported. The caller keeps the last
good model in force; this class never reports a partial model.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass

from controlplane.model import (
    ConfigIssue,
    FileResult,
    LoadResult,
    MeshModel,
    assemble,
    load_file,
)
from controlplane.sources.reporting import ReportingSource

SUFFIXES = (".yaml", ".yml")
_NONE = object()
Signature = tuple[tuple[str, int, int, int], ...]


def config_files(path: str) -> list[os.DirEntry]:
    """The config files of a directory, sorted by name (raises OSError when unreadable)."""
    out = []
    with os.scandir(path) as it:
        for entry in it:
            if entry.name.startswith(".") or not entry.name.endswith(SUFFIXES):
                continue
            try:
                if entry.is_file():
                    out.append(entry)
            except OSError:
                continue
    return sorted(out, key=lambda e: e.name)


def signature(path: str) -> Signature | None:
    """(name, inode, mtime_ns, size) per config file; None when the directory is missing."""
    try:
        entries = config_files(path)
    except OSError:
        return None
    sig = []
    for e in entries:
        try:
            st = e.stat()   # follows symlinks
        except OSError:
            continue
        sig.append((e.name, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(sig)


@dataclass
class _Cached:
    key: tuple[int, int, int]
    result: FileResult


class DirectoryLoader:
    """Loads a directory, re-parsing only files whose (inode, mtime, size) changed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._cache: dict[str, _Cached] = {}

    def load(self, sig: Signature | None | object = _NONE) -> LoadResult:
        """Load the directory as described by `sig` (default: look now); None = directory missing."""
        if sig is _NONE:
            sig = signature(self.path)
        if sig is None:
            return LoadResult(None, [_dir_issue(self.path)])
        results = []
        cache: dict[str, _Cached] = {}
        for name, ino, mtime, size in sig:
            key = (ino, mtime, size)
            hit = self._cache.get(name)
            if hit is None or hit.key != key:
                hit = _Cached(key, read_config_file(os.path.join(self.path, name), name))
            cache[name] = hit
            results.append(hit.result)
        self._cache = cache
        return assemble(results)


def _dir_issue(path: str) -> ConfigIssue:
    if not os.path.exists(path):
        return ConfigIssue(path, message="config directory does not exist")
    if not os.path.isdir(path):
        return ConfigIssue(path, message="not a directory")
    return ConfigIssue(path, message="config directory cannot be read")


def read_config_file(full: str, name: str) -> FileResult:
    try:
        with open(full, "rb") as f:
            raw = f.read()
    except OSError as exc:
        return FileResult(name, (), (ConfigIssue(name, message=f"cannot read: {exc.strerror}"),))
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        return FileResult(name, (), (ConfigIssue(name, line, message=f"not valid UTF-8: {exc.reason} "
                                                                     f"at byte {exc.start}"),))
    return load_file(name, text)


def load_directory(path: str) -> LoadResult:
    """Load and validate every *.yaml / *.yml file directly in `path` (not recursive)."""
    return DirectoryLoader(str(path)).load()


class FileSource(ReportingSource):
    """Watches a config directory; see the module docstring for the callback contract."""

    kind = "files"

    def __init__(self, path: str, on_change: Callable[[MeshModel], None],
                 on_error: Callable[[list[ConfigIssue]], None], interval: float = 0.2) -> None:
        super().__init__(on_change, on_error)
        self.path = str(path)
        self.interval = interval
        self.loader = DirectoryLoader(self.path)
        self._loaded: object = _NONE    # signature of the last reported load
        self._pending: object = _NONE   # a new signature seen once, waiting to be seen stable

    # -- one step of the watch loop; plain code so tests can drive it without timing
    def poll(self) -> bool:
        """Look once; load when the directory changed and has been stable since the last look.
        Returns True when a load was reported."""
        sig = signature(self.path)
        if not self._should_load(sig):
            return False
        result = self.loader.load(sig)
        return self._finish(sig, result, signature(self.path))

    def load_now(self) -> LoadResult:
        """Load immediately (no debounce), e.g. at startup; reports through the callbacks too."""
        sig = signature(self.path)
        result = self.loader.load(sig)
        self._finish(sig, result, sig)
        return result

    async def initial_load(self) -> None:
        self.load_now()

    def describe(self) -> dict:
        return {"kind": self.kind, "config_dir": self.path}

    async def run(self) -> None:
        """Poll forever (cancel the task to stop). Parsing runs in a worker thread so a large
        directory does not stall the event loop; callbacks run on the loop."""
        while True:
            sig = signature(self.path)
            if self._should_load(sig):
                result = await asyncio.to_thread(self.loader.load, sig)
                self._finish(sig, result, signature(self.path))
            await asyncio.sleep(self.interval)

    def _should_load(self, sig: Signature | None) -> bool:
        if sig == self._loaded:
            self._pending = _NONE
            return False
        if sig != self._pending:
            self._pending = sig     # changed: wait one more interval for writers to finish
            return False
        return True

    def _finish(self, sig: Signature | None, result: LoadResult, after: Signature | None) -> bool:
        if after != sig:            # changed while reading: load again once it settles
            self._pending = after
            return False
        self._loaded, self._pending = sig, _NONE
        self._report(result)
        return True
