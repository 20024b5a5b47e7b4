"""The lab's cgroup v2 tree: one directory per pod (eBPF capture attaches there) and per node."""

from __future__ import annotations

import os
from pathlib import Path

from meshlab.errors import LabError
from nodeagent.cgroups import find_cgroup2_mount


def cgroup_root() -> Path:
    mount = find_cgroup2_mount()
    if mount is None:
        raise LabError("no cgroup v2 hierarchy is mounted (hostmesh check explains what is needed)")
    return Path(mount)


def create(rel: str) -> Path:
    path = cgroup_root() / rel
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LabError(f"cannot create cgroup {path}: {exc.strerror}") from None
    return path


def procs_file(rel: str) -> str:
    return str(cgroup_root() / rel / "cgroup.procs")


def tree_pids(top: Path) -> set[int]:
    pids: set[int] = set()
    if not top.is_dir():
        return pids
    for dirpath, _dirs, files in os.walk(top):
        if "cgroup.procs" in files:
            try:
                pids |= {int(x) for x in Path(dirpath, "cgroup.procs").read_text().split()}
            except OSError:
                pass
    return pids


def remove_tree(top: Path) -> list[str]:
    """rmdir every directory below and including `top`, deepest first; returns what stayed."""
    if not top.is_dir():
        return []
    left = []
    for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
        try:
            os.rmdir(dirpath)
        except OSError as exc:
            left.append(f"{dirpath}: {exc.strerror}")
    return left
