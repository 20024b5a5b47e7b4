"""Load, pin, attach and detach hostmesh's eBPF programs (bpf/*.c) — one class owns it all.

    with BpfLoader("lab-node1") as ld:       # pins live in /sys/fs/bpf/hostmesh/lab-node1/
        ld.load()                             # adopt the pinned programs, or compile with bcc
        ld.attach_cgroup("/sys/fs/cgroup/unified/hm-lab/node1/pod-1", "connect4")
        ld.maps["hm_config"].put(0, cfg)
    # leaving the block closes this process's fds; attachments and pins stay (that is the
    # point: capture survives the agent). An exception inside the block undoes whatever
    # *this* block attached or pinned, so a failed install leaves nothing new behind.
    BpfLoader("lab-node1").remove_all()      # detach + unpin everything of the instance

Programs are compiled by bcc from their files (``BPF(src_file=..., cflags=[...])``): one
C file per attach point, the configuration in maps. The only -D flag is the pin directory.
The compile runs in a child process (``python -m nodeagent.capture.ebpf_loader compile``)
that pins the programs: LLVM never enters the agent (its RSS stays ~55 MB instead of
~200 MB) and the agent only ever opens pinned objects.

Persistence. Every map is pinned by the programs themselves (bcc's BPF_TABLE_PINNED opens
the pin when it exists), every program is pinned by the loader, and ``hm_meta`` records a
build id (sha256 of the sources, flags, kernel release and bcc version). A new agent whose
build id matches adopts the pinned programs without compiling anything; otherwise it
compiles, pins the new programs over the old pins, attaches them next to the old ones and
then detaches the old ones (never a moment without capture), reusing the pinned maps when
their layout still matches. Cgroup attachments are legacy BPF_PROG_ATTACH with
BPF_F_ALLOW_MULTI: the kernel keeps them when the agent dies (fail closed) and other
tools' programs on the same cgroups are left alone.

Programs attach to one of four things (``Program.target``): cgroups (legacy attach, as
above), the tc ingress hook, the network namespace (sk_lookup, through a BPF link pinned
as ``link_sk_lookup``: links are the only way to attach it, and the pin keeps it after the
agent dies, like the other attachments), or a sockmap — sk_msg is attached to the hm_socks
sockhash, so the attachment lives as long as the pinned map and needs no bookkeeping of
its own.

Bookkeeping: ``hm_cgroups`` (cgroup id -> path, attach types) records every attachment so
``remove_all()`` finds them again after a crash or a config change. Programs are
recognised as ours by name (``hm_*``) on cgroups this instance manages.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import platform
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nodeagent.capture import ebpf_maps as m
from nodeagent.capture import ebpf_sys as sysb
from nodeagent.errors import CaptureError

log = logging.getLogger("hostmesh.capture.ebpf")

PIN_ROOT = "/sys/fs/bpf/hostmesh"
BPF_DIR = Path(os.environ.get("HOSTMESH_BPF_DIR") or Path(__file__).resolve().parents[2] / "bpf")
INSTANCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# tc: our filter on clsact ingress (pref + handle identify it; the name says whose it is)
TC_PARENT_INGRESS = 0xFFFFFFF2
TC_PARENT_EGRESS = 0xFFFFFFF3
TC_PREF = 15006
TC_HANDLE = 1
# sk_lookup is attached to the node's netns with a BPF link, pinned here so it outlives the agent
NETNS_LINK_PIN = "link_sk_lookup"


@dataclass(frozen=True)
class Program:
    key: str            # short name: pins are prog_<key>
    file: str           # bpf/<file>
    func: str           # function name (= kernel program name, <= 15 chars)
    prog_type: int
    attach_type: int    # expected_attach_type / cgroup attach type; -1 for tc
    target: str = "cgroup"  # what it attaches to: "cgroup", "tc", "netns", or the name of a sockmap/sockhash

    @property
    def load_attach_type(self) -> int:
        """expected_attach_type at load time: cgroup and netns (sk_lookup) programs declare one."""
        return self.attach_type if self.target in ("cgroup", "netns") else -1


PROGRAMS: dict[str, Program] = {p.key: p for p in (
    Program("connect4", "connect4.c", "hm_connect4", sysb.PROG_TYPE_CGROUP_SOCK_ADDR, sysb.ATTACH_CGROUP_INET4_CONNECT),
    Program("connect6", "connect6.c", "hm_connect6", sysb.PROG_TYPE_CGROUP_SOCK_ADDR, sysb.ATTACH_CGROUP_INET6_CONNECT),
    Program("sockops", "sockops.c", "hm_sockops", sysb.PROG_TYPE_SOCK_OPS, sysb.ATTACH_CGROUP_SOCK_OPS),
    Program("getsockopt", "getsockopt.c", "hm_getsockopt", sysb.PROG_TYPE_CGROUP_SOCKOPT, sysb.ATTACH_CGROUP_GETSOCKOPT),
    Program("tc_inbound", "tc_inbound.c", "hm_tc_inbound", sysb.PROG_TYPE_SCHED_CLS, -1, "tc"),
    Program("sk_lookup", "sk_lookup.c", "hm_sk_lookup", sysb.PROG_TYPE_SK_LOOKUP, sysb.ATTACH_SK_LOOKUP, "netns"),
    # same-node acceleration (attached only when it is switched on)
    Program("sockops_accel", "sockops_accel.c", "hm_sock_accel", sysb.PROG_TYPE_SOCK_OPS, sysb.ATTACH_CGROUP_SOCK_OPS),
    Program("sk_msg", "sk_msg.c", "hm_sk_msg", sysb.PROG_TYPE_SK_MSG, sysb.ATTACH_SK_MSG_VERDICT, "hm_socks"),
)}
CGROUP_PROGRAMS = {p.key: p for p in PROGRAMS.values() if p.target == "cgroup"}
CGROUP_ATTACH_TYPES = sorted({p.attach_type for p in CGROUP_PROGRAMS.values()})
OUR_PROG_NAMES = {p.func for p in PROGRAMS.values()}


def check_instance(instance: str) -> str:
    if not isinstance(instance, str) or not INSTANCE_RE.match(instance):
        raise CaptureError(f"ebpf capture: instance {instance!r} must be 1-64 characters of letters, digits, "
                           f"'.', '_' or '-' (it names /sys/fs/bpf/hostmesh/<instance>)")
    return instance


def is_bpffs(path: str) -> bool:
    try:
        for line in open("/proc/self/mounts"):
            parts = line.split()
            if len(parts) >= 3 and parts[1] == path and parts[2] == "bpf":
                return True
    except OSError:
        pass
    return False


def ensure_bpffs(root: str = "/sys/fs/bpf") -> None:
    """Pins need a bpf filesystem at /sys/fs/bpf; mount one when there is none (as Cilium does)."""
    if is_bpffs(root):
        return
    if not os.path.isdir(root):
        raise CaptureError(f"ebpf capture: {root} does not exist: the kernel has no sysfs bpf mount point "
                           f"(CONFIG_BPF_SYSCALL)")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", root.encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise CaptureError(f"ebpf capture: {root} is not a bpf filesystem and mounting one failed "
                           f"({os.strerror(err)}); mount it: mount -t bpf bpf {root}")
    log.info("mounted a bpf filesystem at %s (pins need one)", root)


def cgroup_id(path: str) -> int:
    """A cgroup v2 directory's id: its inode number (what bpf_get_current_cgroup_id returns)."""
    return os.stat(path).st_ino


def source_with_includes(path: Path, root: Path, seen: set[Path] | None = None) -> str:
    """A program file with our own ``#include "lib/..."`` headers inlined (for --dump-bpf)."""
    seen = set() if seen is None else seen
    out = []
    for line in path.read_text().splitlines():
        mm = re.match(r'\s*#include\s+"([^"]+)"', line)
        if mm and (root / mm.group(1)).is_file():
            inc = (root / mm.group(1)).resolve()
            if inc in seen:
                out.append(f"/* {line.strip()} (already included) */")
                continue
            seen.add(inc)
            out.append(f"/* ---- begin {mm.group(1)} ---- */")
            out.append(source_with_includes(inc, root, seen))
            out.append(f"/* ---- end {mm.group(1)} ---- */")
        else:
            out.append(line)
    return "\n".join(out)


class BpfLoader:
    """Owns the programs, maps, pins and attachments of one instance (see module docstring)."""

    def __init__(self, instance: str, *, pin_root: str = PIN_ROOT, bpf_dir: Path | str = BPF_DIR) -> None:
        self.instance = check_instance(instance)
        self.pin_root = pin_root
        self.pin_dir = os.path.join(pin_root, instance)
        self.bpf_dir = Path(bpf_dir)
        self.progs: dict[str, int] = {}          # key -> fd
        self.prog_ids: dict[str, int] = {}       # key -> kernel id
        self.maps: dict[str, m.Map] = {}
        self.how_loaded = ""                     # "adopted" | "compiled"
        self._lock = threading.RLock()
        self._undo: list[tuple[str, tuple]] | None = None

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> BpfLoader:
        self._undo = []
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        undo, self._undo = self._undo or [], None
        if exc_type is not None:
            for action, args in reversed(undo):
                try:
                    if action == "cgroup":
                        self._detach_prog_id(*args)
                    elif action == "pins_since":
                        for name in set(self.pinned()) - args[0]:  # pinned by this block
                            os.unlink(self._pin(name))
                    elif action == "dir":
                        os.rmdir(args[0])
                    elif action == "tc":
                        self.detach_tc(*args)
                    elif action == "netns":
                        self.detach_netns()
                except (OSError, CaptureError) as e:
                    log.warning("rollback step %s%s failed: %s", action, args, e)
        self.close()

    def _record(self, action: str, *args) -> None:
        if self._undo is not None:
            self._undo.append((action, args))

    def close(self) -> None:
        """Close this process's fds; pins and attachments stay."""
        for fd in self.progs.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.progs.clear()
        self.prog_ids.clear()
        for mp in self.maps.values():
            mp.close()
        self.maps.clear()

    # ------------------------------------------------------------------ sources
    def cflags(self) -> list[str]:
        return [f"-I{self.bpf_dir}", f'-DHM_PIN_DIR="{self.pin_dir}"']

    def source_files(self) -> list[Path]:
        files = [self.bpf_dir / p.file for p in PROGRAMS.values()]
        files += sorted((self.bpf_dir / "lib").glob("*.h"))
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CaptureError(f"ebpf capture: program sources missing: {', '.join(missing)} "
                               f"(set HOSTMESH_BPF_DIR to the bpf/ directory)")
        return files

    def build_id(self) -> bytes:
        h = hashlib.sha256()
        h.update(f"layout={m.HM_LAYOUT_VERSION}\0kernel={platform.release()}\0".encode())
        h.update(f"bcc={_bcc_version()}\0".encode())
        h.update("\0".join(self.cflags()).encode())
        for f in self.source_files():
            h.update(b"\0" + f.name.encode() + b"\0" + f.read_bytes())
        return h.digest()

    def dump_source(self) -> str:
        """The final source of every program, as bcc compiles it (our headers inlined)."""
        parts = []
        for p in PROGRAMS.values():
            parts.append(f"/* ==== bpf/{p.file}: {p.func}, cflags: {' '.join(self.cflags())} ==== */")
            parts.append(source_with_includes(self.bpf_dir / p.file, self.bpf_dir))
        return "\n".join(parts) + "\n"

    # ------------------------------------------------------------------ pins
    def _pin(self, name: str) -> str:
        return os.path.join(self.pin_dir, name)

    def pinned(self) -> list[str]:
        try:
            return sorted(os.listdir(self.pin_dir))
        except FileNotFoundError:
            return []

    def exists(self) -> bool:
        return os.path.isdir(self.pin_dir)

    def _open_pinned_maps(self) -> None:
        for name, spec in m.MAPS.items():
            if name not in self.maps:
                self.maps[name] = m.Map.open_pinned(spec, self._pin(name))

    def _open_pinned_progs(self) -> bool:
        fds = {}
        try:
            for key in PROGRAMS:
                fds[key] = sysb.obj_get(self._pin(f"prog_{key}"))
        except OSError:
            for fd in fds.values():
                os.close(fd)
            return False
        self.progs = fds
        self.prog_ids = {k: sysb.prog_info(fd)[0].id for k, fd in fds.items()}
        return True

    def pinned_build_id(self) -> bytes | None:
        path = self._pin("hm_meta")
        if not os.path.exists(path):
            return None
        try:
            meta = m.Map.open_pinned(m.MAPS["hm_meta"], path)
        except OSError:
            return None
        try:
            if m.check_kernel_map(meta.spec, meta.fd):
                return None
            v = meta.get(0)
            if v is None or v.layout != m.HM_LAYOUT_VERSION:
                return None
            return bytes(v.build_id)
        finally:
            meta.close()

    def _drop_incompatible_map_pins(self) -> None:
        for name, spec in m.MAPS.items():
            path = self._pin(name)
            if not os.path.exists(path):
                continue
            try:
                fd = sysb.obj_get(path)
            except OSError:
                os.unlink(path)
                continue
            try:
                problems = m.check_kernel_map(spec, fd)
            finally:
                os.close(fd)
            if problems:
                log.warning("pinned map %s does not match this build (%s); replacing it", path, "; ".join(problems))
                os.unlink(path)

    # ------------------------------------------------------------------ load
    def load(self, *, compile: bool = True) -> str:
        """Adopt the pinned programs when their build id matches, else compile and pin.

        compile=False only adopts (for removal and inspection): raises CaptureError when
        there is nothing adoptable.
        """
        with self._lock:
            want = self.build_id() if compile else None
            have = self.pinned_build_id()
            if have is not None and (want is None or have == want) and self._open_pinned_progs():
                self._open_pinned_maps()
                self.how_loaded = "adopted"
                return self.how_loaded
            if not compile:
                raise CaptureError(f"ebpf capture: nothing adoptable pinned in {self.pin_dir}")
            ensure_bpffs()
            if not os.path.isdir(self.pin_root):
                os.makedirs(self.pin_root, exist_ok=True)
            if not os.path.isdir(self.pin_dir):
                os.mkdir(self.pin_dir)
                self._record("dir", self.pin_dir)
            self._drop_incompatible_map_pins()
            self._record("pins_since", set(self.pinned()))
            self._compile_and_pin()
            self._open_pinned_maps()
            for name, spec in m.MAPS.items():
                problems = m.check_kernel_map(spec, self.maps[name].fd)
                if problems:
                    raise CaptureError("ebpf capture: map layout mismatch: " + "; ".join(problems))
            meta = m.HmMeta(layout=m.HM_LAYOUT_VERSION)
            ctypes.memmove(meta.build_id, want, 32)
            self.maps["hm_meta"].put(0, meta)
            self.how_loaded = "compiled"
            return self.how_loaded

    def _compile_and_pin(self) -> None:
        """Compile in a child process, which pins the programs; then open the pins.

        bcc brings LLVM/clang into the process (~150 MB RSS that would stay for the agent's
        whole life); a child keeps the agent small and its event loop free of the compile.
        """
        import subprocess
        import sys

        argv = [sys.executable, "-m", "nodeagent.capture.ebpf_loader", "compile", self.instance,
                "--pin-root", self.pin_root, "--bpf-dir", str(self.bpf_dir)]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise CaptureError("ebpf capture: compiling the programs took more than 180 s") from None
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            msg = next((ln for ln in reversed(lines) if ln.startswith("ebpf capture:")), None)
            detail = msg or ("; ".join(lines[-5:]) or f"exit {proc.returncode}")
            raise CaptureError(detail if msg else f"ebpf capture: compiling the programs failed: {detail}")
        if not self._open_pinned_progs():
            raise CaptureError(f"ebpf capture: programs missing from {self.pin_dir} after compiling")

    def compile_and_pin_here(self) -> None:
        """Compile every program with bcc in this process and pin it (the child's side)."""
        try:
            from bcc import BPF  # noqa: WPS433 (imported only when compiling)
            from bcc.libbcc import lib
        except ImportError as exc:
            raise CaptureError(f"ebpf capture: bcc is not importable ({exc}); install python3-bpfcc "
                               f"(and make a venv with --system-site-packages)") from None
        fds: dict[str, int] = {}
        try:
            for key, p in PROGRAMS.items():
                try:
                    b = BPF(src_file=str(self.bpf_dir / p.file), cflags=self.cflags())
                except Exception as exc:  # bcc raises plain Exception; the compiler wrote to stderr
                    raise CaptureError(f"ebpf capture: bcc could not compile bpf/{p.file}: {exc} "
                                       f"(kernel headers: /lib/modules/{platform.release()}/build, "
                                       f"or point BCC_KERNEL_SOURCE at them; `hostmesh check` says more)") from None
                with b:
                    problems = []
                    for name in m.MAPS:
                        kd = lib.bpf_table_key_desc(b.module, name.encode())
                        ld = lib.bpf_table_leaf_desc(b.module, name.encode())
                        if kd and ld:
                            problems += m.check_layout(name, json.loads(kd), json.loads(ld))
                    if problems:
                        raise CaptureError("ebpf capture: " + "; ".join(problems))
                    try:
                        fn = b.load_func(p.func, p.prog_type, attach_type=p.load_attach_type)
                    except Exception as exc:
                        raise CaptureError(f"ebpf capture: the kernel refused program {p.func} "
                                           f"(bpf/{p.file}): {exc}") from None
                    fds[key] = os.dup(fn.fd)
            # all compiled: replace the program pins (attachments hold their own references)
            for key, fd in fds.items():
                path = self._pin(f"prog_{key}")
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                sysb.obj_pin(fd, path)
        finally:
            for fd in fds.values():
                os.close(fd)

    # ------------------------------------------------------------------ cgroups
    def attached(self, cgroup: str, attach_type: int) -> list[tuple[int, str]]:
        """(prog id, prog name) attached directly to `cgroup` for `attach_type`."""
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            ids = sysb.prog_query(fd, attach_type)
        finally:
            os.close(fd)
        out = []
        for pid in ids:
            try:
                pfd = sysb.prog_fd_by_id(pid)
            except OSError:
                continue
            try:
                out.append((pid, sysb.prog_info(pfd)[0].name.decode(errors="replace")))
            finally:
                os.close(pfd)
        return out

    def attach_cgroup(self, cgroup: str, key: str) -> bool:
        """Attach program `key` to `cgroup` (once), then detach older copies of it. True if changed."""
        p = PROGRAMS[key]
        prog_id = self.prog_ids[key]
        current = self.attached(cgroup, p.attach_type)
        changed = False
        if not any(pid == prog_id for pid, _ in current):
            fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                sysb.prog_attach(self.progs[key], fd, p.attach_type, sysb.BPF_F_ALLOW_MULTI)
            except OSError as exc:
                raise CaptureError(f"ebpf capture: cannot attach {p.func} to {cgroup}: {exc.strerror}"
                                   + (" (a program attached there without BPF_F_ALLOW_MULTI excludes others)"
                                      if exc.errno == errno.EPERM else "")) from None
            finally:
                os.close(fd)
            self._record("cgroup", cgroup, p.attach_type, prog_id)
            changed = True
        for pid, name in current:
            if pid != prog_id and name == p.func:
                self._detach_prog_id(cgroup, p.attach_type, pid)  # an older build of ours
                changed = True
        self._register(cgroup, p.attach_type)
        return changed

    def _detach_prog_id(self, cgroup: str, attach_type: int, prog_id: int) -> None:
        try:
            pfd = sysb.prog_fd_by_id(prog_id)
        except OSError:
            return
        try:
            cfd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            os.close(pfd)
            return
        try:
            sysb.prog_detach(pfd, cfd, attach_type)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        finally:
            os.close(cfd)
            os.close(pfd)

    def detach_cgroup(self, cgroup: str, attach_types: Iterable[int] | None = None) -> int:
        """Detach every program of ours (by name) from `cgroup`; returns how many."""
        n = 0
        if not os.path.isdir(cgroup):
            return 0
        for at in (attach_types if attach_types is not None else CGROUP_ATTACH_TYPES):
            for pid, name in self.attached(cgroup, at):
                if name in OUR_PROG_NAMES:
                    self._detach_prog_id(cgroup, at, pid)
                    n += 1
        return n

    def detach_program(self, cgroup: str, key: str) -> int:
        """Detach program `key` (any build of it, by name) from `cgroup`; returns how many."""
        p = PROGRAMS[key]
        n = 0
        if not os.path.isdir(cgroup):
            return 0
        for pid, name in self.attached(cgroup, p.attach_type):
            if name == p.func:
                self._detach_prog_id(cgroup, p.attach_type, pid)
                n += 1
        return n

    def _register(self, cgroup: str, attach_type: int) -> None:
        reg = self.maps.get("hm_cgroups")
        if reg is None:
            return
        cid = cgroup_id(cgroup)
        entry = reg.get(cid) or m.HmAttachment()
        entry.attach_types |= 1 << attach_type
        path = os.fsencode(cgroup)
        if len(path) >= m.HM_CGROUP_PATH_MAX:
            raise CaptureError(f"ebpf capture: cgroup path too long for the bookkeeping map: {cgroup}")
        entry.path = path
        reg.put(cid, entry)

    def registered_cgroups(self) -> dict[str, int]:
        """path -> attach type bitmask, from hm_cgroups."""
        reg = self.maps.get("hm_cgroups")
        if reg is None:
            return {}
        return {os.fsdecode(v.path): v.attach_types for _, v in reg.items()}

    def unregister(self, cgroup: str, attach_types_mask: int | None = None) -> None:
        reg = self.maps.get("hm_cgroups")
        if reg is None:
            return
        for k, v in reg.items():
            if os.fsdecode(v.path) == cgroup:
                if attach_types_mask is None or not (v.attach_types & ~attach_types_mask):
                    reg.delete(k)
                else:
                    v.attach_types &= ~attach_types_mask
                    reg.put(k, v)

    # ------------------------------------------------------------------ sockmap programs
    def sockmap_attached(self, key: str) -> list[int]:
        """Ids of the programs attached to program `key`'s map for its attach type."""
        p = PROGRAMS[key]
        return sysb.prog_query(self.maps[p.target].fd, p.attach_type)

    def attach_sockmap(self, key: str) -> bool:
        """Attach program `key` (sk_msg) to its map; the kernel replaces an older one. True if changed."""
        p = PROGRAMS[key]
        if self.prog_ids[key] in self.sockmap_attached(key):
            return False
        try:
            sysb.prog_attach(self.progs[key], self.maps[p.target].fd, p.attach_type, 0)
        except OSError as exc:
            raise CaptureError(f"ebpf capture: cannot attach {p.func} to the {p.target} map: {exc.strerror}") from None
        return True

    def detach_sockmap(self, key: str) -> int:
        """Detach every program from program `key`'s map (only ours can be there: the map is ours)."""
        p = PROGRAMS[key]
        mp = self.maps.get(p.target)
        if mp is None:
            return 0
        n = 0
        for pid in sysb.prog_query(mp.fd, p.attach_type):
            try:
                pfd = sysb.prog_fd_by_id(pid)
            except OSError:
                continue
            try:
                sysb.prog_detach(pfd, mp.fd, p.attach_type)
                n += 1
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            finally:
                os.close(pfd)
        return n

    # ------------------------------------------------------------------ sk_lookup (current netns)
    def netns_link(self) -> dict | None:
        """The pinned sk_lookup link: its id, program id and netns inode (0: detached), or None."""
        try:
            fd = sysb.obj_get(self._pin(NETNS_LINK_PIN))
        except OSError:
            return None
        try:
            info = sysb.link_info(fd)
        finally:
            os.close(fd)
        return {"id": info.id, "prog_id": info.prog_id, "netns_ino": info.netns_ino}

    def attach_netns(self) -> bool:
        """sk_lookup on this thread's netns through a pinned BPF link. True if changed.

        An existing link on this netns keeps its id: a changed build swaps the program in
        place (BPF_LINK_UPDATE, never a moment without one); a link left on another (or a
        destroyed) netns is detached and replaced."""
        path = self._pin(NETNS_LINK_PIN)
        ino = os.stat("/proc/thread-self/ns/net").st_ino
        prog_fd = self.progs["sk_lookup"]
        try:
            fd = sysb.obj_get(path)
        except OSError:
            fd = None
        if fd is not None:
            try:
                info = sysb.link_info(fd)
                if info.netns_ino == ino:
                    if info.prog_id == self.prog_ids["sk_lookup"]:
                        return False
                    sysb.link_update(fd, prog_fd)
                    return True
                if info.netns_ino:
                    sysb.link_detach(fd)
            finally:
                os.close(fd)
            os.unlink(path)
        nsfd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            link = sysb.link_create(prog_fd, nsfd, sysb.ATTACH_SK_LOOKUP)
        except OSError as exc:
            raise CaptureError(f"ebpf capture: cannot attach sk_lookup to the network namespace: {exc} "
                               f"(needs Linux 5.9+)") from None
        finally:
            os.close(nsfd)
        try:
            sysb.obj_pin(link, path)  # if this fails, closing the only fd destroys the link: nothing left
        finally:
            os.close(link)
        self._record("netns")
        return True

    def detach_netns(self) -> bool:
        """Detach and unpin the sk_lookup link (whichever netns it is on). True if there was one."""
        path = self._pin(NETNS_LINK_PIN)
        try:
            fd = sysb.obj_get(path)
        except OSError:
            return False
        try:
            try:
                sysb.link_detach(fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOLINK, errno.EINVAL):
                    raise CaptureError(f"ebpf capture: cannot detach sk_lookup: {exc}") from None
        finally:
            os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return True

    # ------------------------------------------------------------------ tc (current netns)
    def tc_name(self) -> str:
        return f"hostmesh:{self.instance}:{self.prog_ids.get('tc_inbound', 0)}"

    def attach_tc(self, ifname: str) -> bool:
        """clsact ingress filter with tc_inbound on `ifname` (in this thread's netns). True if changed."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        want = self.tc_name()
        with IPRoute() as ipr:
            idx = _ifindex(ipr, ifname)
            have = _tc_ours(ipr, idx)
            if have == [want]:
                return False
            try:
                ipr.tc("add", "clsact", idx)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise CaptureError(f"ebpf capture: cannot add a clsact qdisc to {ifname}: {exc}") from None
            try:
                ipr.tc("replace-filter", "bpf", idx, TC_HANDLE, fd=self.progs["tc_inbound"], name=want,
                       parent=TC_PARENT_INGRESS, prio=TC_PREF, protocol=0x0003, classid=1, direct_action=True)
            except NetlinkError as exc:
                raise CaptureError(f"ebpf capture: cannot attach tc ingress program to {ifname}: {exc}") from None
        self._record("tc", ifname)
        return True

    def detach_tc(self, ifname: str) -> bool:
        """Remove our ingress filter from `ifname`; the clsact qdisc too when nothing else uses it."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            try:
                idx = _ifindex(ipr, ifname)
            except CaptureError:
                return False
            if not _tc_ours(ipr, idx):
                return False
            try:
                ipr.tc("del-filter", "bpf", idx, TC_HANDLE, parent=TC_PARENT_INGRESS, prio=TC_PREF, protocol=0x0003)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.EINVAL):
                    raise CaptureError(f"ebpf capture: cannot remove tc filter from {ifname}: {exc}") from None
            if not _tc_filters(ipr, idx, TC_PARENT_INGRESS) and not _tc_filters(ipr, idx, TC_PARENT_EGRESS):
                try:
                    ipr.tc("del", "clsact", idx)
                except NetlinkError:
                    pass
        return True

    def tc_interfaces(self) -> dict[str, list[str]]:
        """ifname -> names of our filters, for every interface of this thread's netns."""
        from pyroute2 import IPRoute

        out = {}
        with IPRoute() as ipr:
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME")
                ours = _tc_ours(ipr, link["index"])
                if ours:
                    out[name] = ours
        return out

    # ------------------------------------------------------------------ counters
    def counters(self) -> dict[str, int]:
        mp = self.maps.get("hm_counters")
        if mp is None:
            return {}
        return {name: mp.sum_percpu(i) for i, name in enumerate(m.COUNTERS)}

    # ------------------------------------------------------------------ removal
    def unpin_all(self) -> list[str]:
        """Remove every pin of this instance and its directory; returns what was removed."""
        removed = []
        for name in self.pinned():
            try:
                os.unlink(self._pin(name))
                removed.append(name)
            except FileNotFoundError:
                pass
        for d in (self.pin_dir, self.pin_root):
            try:
                os.rmdir(d)
            except OSError:
                pass
        return removed


def _ifindex(ipr, ifname: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise CaptureError(f"ebpf capture: interface {ifname} does not exist")
    return idx[0]


def _tc_filters(ipr, idx: int, parent: int) -> list:
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        return [f for f in ipr.get_filters(index=idx, parent=parent) if f.get_attr("TCA_KIND")]
    except NetlinkError:
        return []


def _tc_ours(ipr, idx: int) -> list[str]:
    out = []
    for f in _tc_filters(ipr, idx, TC_PARENT_INGRESS):
        if f.get_attr("TCA_KIND") != "bpf" or (f["info"] >> 16) != TC_PREF:
            continue
        opts = f.get_attr("TCA_OPTIONS")
        name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        if name and name.startswith("hostmesh:"):
            out.append(name)
    return out


_BCC_VERSION: str | None = None


def _bcc_version() -> str:
    """The installed bcc, without importing it (libbcc is large): python metadata, else the
    versioned libbcc file name. Part of the build id: a new bcc means a rebuild."""
    global _BCC_VERSION
    if _BCC_VERSION is None:
        import glob
        import importlib.metadata
        try:
            _BCC_VERSION = importlib.metadata.version("bcc")
        except Exception:  # noqa: BLE001 (PackageNotFoundError, broken metadata)
            libs = sorted(os.path.basename(os.path.realpath(p)) for p in glob.glob("/usr/lib*/**/libbcc.so*",
                                                                                   recursive=True))
            _BCC_VERSION = libs[-1] if libs else "unknown"
    return _BCC_VERSION


def instances(pin_root: str = PIN_ROOT) -> list[str]:
    try:
        return sorted(d for d in os.listdir(pin_root) if os.path.isdir(os.path.join(pin_root, d)))
    except FileNotFoundError:
        return []


def orphaned(instance: str, pin_root: str = PIN_ROOT) -> bool:
    """An instance is garbage when it recorded cgroups and none of them exists any more
    (e.g. a lab was torn down while its agent was SIGKILLed)."""
    ld = BpfLoader(instance, pin_root=pin_root)
    try:
        reg = m.Map.open_pinned(m.MAPS["hm_cgroups"], ld._pin("hm_cgroups"))
    except OSError:
        return False
    try:
        paths = [os.fsdecode(v.path) for _, v in reg.items()]
    finally:
        reg.close()
    return bool(paths) and not any(os.path.isdir(p) for p in paths)


def collect_orphans(pin_root: str = PIN_ROOT, keep: str = "") -> list[str]:
    """Unpin instances whose cgroups are all gone (their attachments went with them)."""
    removed = []
    for inst in instances(pin_root):
        if inst == keep or not INSTANCE_RE.match(inst):
            continue
        try:
            if orphaned(inst, pin_root):
                BpfLoader(inst, pin_root=pin_root).unpin_all()
                removed.append(inst)
                log.info("removed the pins of orphaned eBPF capture instance %s", inst)
        except (OSError, CaptureError) as exc:
            log.warning("could not check eBPF instance %s: %s", inst, exc)
    return removed


__all__ = ["BPF_DIR", "PIN_ROOT", "PROGRAMS", "BpfLoader", "collect_orphans", "ensure_bpffs", "instances"]


def main(argv: list[str] | None = None) -> int:
    """python -m nodeagent.capture.ebpf_loader compile INSTANCE: the loader's compile child."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m nodeagent.capture.ebpf_loader")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile bpf/*.c with bcc and pin the programs (used by the agent)")
    c.add_argument("instance")
    c.add_argument("--pin-root", default=PIN_ROOT)
    c.add_argument("--bpf-dir", default=str(BPF_DIR))
    args = ap.parse_args(argv)
    try:
        BpfLoader(args.instance, pin_root=args.pin_root, bpf_dir=args.bpf_dir).compile_and_pin_here()
    except CaptureError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

