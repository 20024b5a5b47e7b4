"""cgroup discovery for the node agent: where cgroup v2 is mounted and which layout the host uses.

Only reads /proc (no writes, no privileges). The eBPF capture backend attaches its
cgroup programs (cgroup/connect4, sockops, cgroup/getsockopt) to a cgroup v2 directory,
which is ``/sys/fs/cgroup`` on a unified host and usually ``/sys/fs/cgroup/unified`` on a
hybrid (v1 controllers + v2 for BPF) host.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"

# mount points listed in order of preference when several cgroup2 mounts are visible
_PREFERRED = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One line of /proc/<pid>/mountinfo (see proc(5))."""

    mount_id: int
    parent_id: int
    root: str  # the directory of the filesystem that is mounted here
    mount_point: str
    fstype: str
    source: str
    super_options: str


def _unescape(field: str) -> str:
    # the kernel escapes space, tab, newline and backslash as \040, \011, \012, \134
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse mountinfo text; malformed lines are skipped."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf = left.split()
        rf = right.split()
        if len(lf) < 6 or len(rf) < 2:
            continue
        try:
            mount_id, parent_id = int(lf[0]), int(lf[1])
        except ValueError:
            continue
        mounts.append(
            Mount(
                mount_id=mount_id,
                parent_id=parent_id,
                root=_unescape(lf[3]),
                mount_point=_unescape(lf[4]),
                fstype=rf[0],
                source=_unescape(rf[1]),
                super_options=rf[2] if len(rf) > 2 else "",
            )
        )
    return mounts


def _visible(mounts: list[Mount]) -> list[Mount]:
    """Drop mounts hidden by a later mount on the same mount point."""
    last = {m.mount_point: m.mount_id for m in mounts}
    return [m for m in mounts if last[m.mount_point] == m.mount_id]


def _read(path: str | os.PathLike[str]) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def cgroup2_mounts(mountinfo: str | os.PathLike[str] = MOUNTINFO) -> list[str]:
    """Every visible cgroup2 mount point, best first (see find_cgroup2_mount)."""
    try:
        mounts = _visible(parse_mountinfo(_read(mountinfo)))
    except OSError:
        return []
    found = [m for m in mounts if m.fstype == "cgroup2"]

    def rank(m: Mount) -> tuple[int, int]:
        # a mount of the hierarchy's root beats a bind mount of a subdirectory
        pref = _PREFERRED.index(m.mount_point) if m.mount_point in _PREFERRED else len(_PREFERRED)
        return (0 if m.root == "/" else 1, pref)

    return [m.mount_point for m in sorted(found, key=rank)]


def find_cgroup2_mount(mountinfo: str | os.PathLike[str] = MOUNTINFO) -> str | None:
    """Where cgroup v2 is mounted for this process, or None when it is not mounted.

    Parses /proc/self/mountinfo (``mountinfo`` is only overridden by tests). With several
    cgroup2 mounts, a mount of the hierarchy root wins over a bind mount of a
    subdirectory, then /sys/fs/cgroup over /sys/fs/cgroup/unified over anything else.
    """
    found = cgroup2_mounts(mountinfo)
    return found[0] if found else None


def cgroup_layout(mountinfo: str | os.PathLike[str] = MOUNTINFO) -> str:
    """'unified' (v2 only), 'hybrid' (v1 controllers plus a v2 mount), 'legacy' (v1 only)
    or 'none' (no cgroup filesystem visible)."""
    try:
        mounts = _visible(parse_mountinfo(_read(mountinfo)))
    except OSError:
        return "none"
    has_v2 = any(m.fstype == "cgroup2" for m in mounts)
    has_v1 = any(m.fstype == "cgroup" for m in mounts)
    if has_v2 and has_v1:
        return "hybrid"
    if has_v2:
        return "unified"
    if has_v1:
        return "legacy"
    return "none"
