"""The few bpf(2) commands the eBPF capture backend needs, through ctypes.

bcc compiles and loads the programs; everything else — opening pinned objects, map
reads/writes, attaching to cgroups, asking a cgroup what is attached — goes through this
module, so that an agent adopting pinned state does not need a compiler or a bcc module
at all. Each function raises ``BpfError`` (an ``OSError``) carrying errno and the command.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

from nodeagent.errors import CaptureError

_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}

# enum bpf_cmd
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_DETACH = 34

# enum bpf_prog_type (the ones used here)
PROG_TYPE_SCHED_CLS = 3
PROG_TYPE_SOCK_OPS = 13
PROG_TYPE_SK_MSG = 16
PROG_TYPE_CGROUP_SOCK_ADDR = 18
PROG_TYPE_CGROUP_SOCKOPT = 25
PROG_TYPE_SK_LOOKUP = 30

# enum bpf_attach_type (the ones used here)
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_SK_MSG_VERDICT = 7
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET6_CONNECT = 11
ATTACH_CGROUP_GETSOCKOPT = 21
ATTACH_SK_LOOKUP = 36
ATTACH_NAMES = {ATTACH_CGROUP_SOCK_OPS: "sock_ops", ATTACH_CGROUP_INET4_CONNECT: "connect4",
                ATTACH_CGROUP_INET6_CONNECT: "connect6", ATTACH_CGROUP_GETSOCKOPT: "getsockopt",
                ATTACH_SK_MSG_VERDICT: "sk_msg_verdict", ATTACH_SK_LOOKUP: "sk_lookup"}

# enum bpf_map_type (the ones used here)
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LPM_TRIE = 11
MAP_TYPE_LRU_HASH = 9
MAP_TYPE_SOCKMAP = 15
MAP_TYPE_SOCKHASH = 18

BPF_F_ALLOW_MULTI = 1 << 1
BPF_F_NO_PREALLOC = 1 << 0
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_OBJ_NAME_LEN = 16


class BpfError(OSError):
    pass


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _nr() -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise CaptureError(f"ebpf: bpf(2) syscall number unknown for {platform.machine()}")
    return nr


def bpf(cmd: int, attr: ctypes.Structure, what: str = "") -> int:
    """bpf(cmd, &attr, sizeof attr); returns the result or raises BpfError."""
    ret = _libc.syscall(_nr(), ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf({what or cmd}): {os.strerror(err)}")
    return ret


# ------------------------------------------------------------------ bpf_attr variants


class _MapElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class _AttachAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("replace_bpf_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32 * 3)]


class _GetIdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _QueryAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32), ("_pad", ctypes.c_uint32 * 9)]


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("_pad", ctypes.c_uint32 * 8)]


class _LinkUpdateAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("new_prog_fd", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("old_prog_fd", ctypes.c_uint32)]


class _LinkDetachAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32)]


class LinkInfo(ctypes.Structure):
    """struct bpf_link_info with its netns member (the union is 8-byte aligned, at offset 16)."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("prog_id", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32), ("netns_ino", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("_rest", ctypes.c_uint8 * 24)]


class ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info (the kernel fills only what fits)."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
                ("name", ctypes.c_char * BPF_OBJ_NAME_LEN)]


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * BPF_OBJ_NAME_LEN)]


# ------------------------------------------------------------------ objects and pins


def obj_get(path: str) -> int:
    """An fd for the object pinned at `path` (BpfError ENOENT when there is none)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    return bpf(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(p)), f"OBJ_GET {path}")


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(p), bpf_fd=fd), f"OBJ_PIN {path}")


def prog_info(fd: int, map_ids: int = 0) -> tuple[ProgInfo, list[int]]:
    """Program info, and the ids of the maps it uses (up to `map_ids` of them)."""
    info = ProgInfo()
    ids = (ctypes.c_uint32 * max(map_ids, 1))()
    if map_ids:
        info.nr_map_ids = map_ids
        info.map_ids = ctypes.addressof(ids)
    bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)),
        "OBJ_GET_INFO_BY_FD(prog)")
    return info, list(ids[:min(info.nr_map_ids, map_ids)]) if map_ids else []


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)),
        "OBJ_GET_INFO_BY_FD(map)")
    return info


def prog_fd_by_id(prog_id: int) -> int:
    return bpf(BPF_PROG_GET_FD_BY_ID, _GetIdAttr(id=prog_id), f"PROG_GET_FD_BY_ID {prog_id}")


def map_fd_by_id(map_id: int) -> int:
    return bpf(BPF_MAP_GET_FD_BY_ID, _GetIdAttr(id=map_id), f"MAP_GET_FD_BY_ID {map_id}")


# ------------------------------------------------------------------ links


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A BPF link attaching `prog_fd` to `target_fd` (a netns fd for sk_lookup); returns its fd.

    The attachment lives as long as the link: pin it to outlive the process."""
    return bpf(BPF_LINK_CREATE, _LinkCreateAttr(prog_fd=prog_fd, target_fd=target_fd, attach_type=attach_type),
               f"LINK_CREATE {ATTACH_NAMES.get(attach_type, attach_type)}")


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Swap the link's program atomically (no moment without one attached)."""
    bpf(BPF_LINK_UPDATE, _LinkUpdateAttr(link_fd=link_fd, new_prog_fd=new_prog_fd), "LINK_UPDATE")


def link_detach(link_fd: int) -> None:
    """Detach the link's program now, whoever else still holds the link."""
    bpf(BPF_LINK_DETACH, _LinkDetachAttr(link_fd=link_fd), "LINK_DETACH")


def link_info(fd: int) -> LinkInfo:
    info = LinkInfo()
    bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)),
        "OBJ_GET_INFO_BY_FD(link)")
    return info


# ------------------------------------------------------------------ maps


def map_lookup(fd: int, key: ctypes.Structure | ctypes._SimpleCData, value) -> bool:
    """Fill `value` with the entry for `key`; False when there is none."""
    attr = _MapElemAttr(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(value))
    try:
        bpf(BPF_MAP_LOOKUP_ELEM, attr, "MAP_LOOKUP_ELEM")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    bpf(BPF_MAP_UPDATE_ELEM, _MapElemAttr(map_fd=fd, key=ctypes.addressof(key), value=ctypes.addressof(value),
                                          flags=flags), "MAP_UPDATE_ELEM")


def map_delete(fd: int, key) -> bool:
    try:
        bpf(BPF_MAP_DELETE_ELEM, _MapElemAttr(map_fd=fd, key=ctypes.addressof(key)), "MAP_DELETE_ELEM")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_next_key(fd: int, key, next_key) -> bool:
    """Fill `next_key` with the key after `key` (key=None: the first); False at the end."""
    attr = _MapElemAttr(map_fd=fd, key=ctypes.addressof(key) if key is not None else 0,
                        value=ctypes.addressof(next_key))
    try:
        bpf(BPF_MAP_GET_NEXT_KEY, attr, "MAP_GET_NEXT_KEY")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


# ------------------------------------------------------------------ cgroup attachment


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = BPF_F_ALLOW_MULTI) -> None:
    bpf(BPF_PROG_ATTACH, _AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type,
                                     attach_flags=flags), f"PROG_ATTACH {ATTACH_NAMES.get(attach_type, attach_type)}")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    bpf(BPF_PROG_DETACH, _AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type),
        f"PROG_DETACH {ATTACH_NAMES.get(attach_type, attach_type)}")


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached directly to a cgroup (or a sockmap) for `attach_type`."""
    cap = 64
    while True:
        ids = (ctypes.c_uint32 * cap)()
        attr = _QueryAttr(target_fd=target_fd, attach_type=attach_type, prog_ids=ctypes.addressof(ids),
                          prog_cnt=cap)
        try:
            bpf(BPF_PROG_QUERY, attr, f"PROG_QUERY {ATTACH_NAMES.get(attach_type, attach_type)}")
        except BpfError as exc:
            if exc.errno == errno.ENOSPC and cap < 4096:
                cap *= 4
                continue
            raise
        return list(ids[:attr.prog_cnt])
