"""`hostmesh install` / `hostmesh uninstall`: the agent or the control plane on a bare-metal or VM host, under systemd.

What install puts in place (``--role agent``, the default, or ``--role controlplane``):

    /usr/local/bin/hostmesh                 symlink to the hostmesh executable running install
                                            (``--bin``); the units run this path
    /etc/systemd/system/hostmesh-<role>.service, /etc/tmpfiles.d/hostmesh.conf
                                            from the package (``hostmesh/systemd/``)
    agent:        /etc/hostmesh/agent.yaml (the bootstrap, from the flags), /etc/hostmesh/token
                  (0600, copied from --token-file), /etc/hostmesh/root-bundle.pem
    controlplane: /etc/hostmesh/config/ (the operator's YAML goes here), /etc/hostmesh/tokens/
                  (0700; <node>.token files copied from --node-tokens, 0600),
                  /etc/hostmesh/controlplane.env (--tls-san), /var/lib/hostmesh/ca/ (0700)
    /var/lib/hostmesh/install.json          the manifest: every path install created, per role

Rules that make it safe to run again and to undo:

- Everything is checked (flags, the token, the bundle, the rendered bootstrap against the
  agent's own loader) before anything is written: bad input writes nothing.
- Idempotent: only what differs is written; an identical second install reports "no
  change" and touches nothing (not even the manifest, nor systemctl).
- Only what install created is ever changed or removed: a file it would overwrite that
  it did not write (or that was edited since) is a conflict (``--force`` takes it over),
  and uninstall keeps such files and directories that are not empty, and says so.
- ``--root DIR`` installs into DIR as if it were ``/``: every file goes under DIR and every
  path written into those files (units, bootstrap) points under DIR, so the tree runs in
  place (the lab runs agents from such trees). systemctl is never called then.
- systemctl runs only with ``--root /`` (the default), without ``--no-start`` and when
  systemd is the running init (``/run/systemd/system`` exists): install ends with
  daemon-reload, tmpfiles, enable and restart of the unit (a restart of the agent stops it
  first: captured connections are refused, never bypassed, for that moment); uninstall
  starts with ``disable --now``, then removes capture with ``hostmesh agent --config
  /etc/hostmesh/agent.yaml --uninstall`` (a stop leaves capture installed, failing
  closed; removal is this explicit step) and stops if that fails, before removing a file.
  Without systemd, uninstall leaves capture alone unless ``--remove-capture`` is given.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import yaml

ROLES = ("agent", "controlplane")
UNITS = {"agent": "hostmesh-agent.service", "controlplane": "hostmesh-controlplane.service"}
BIN = "/usr/local/bin/hostmesh"
ETC = "/etc/hostmesh"
STATE = "/var/lib/hostmesh"
RUN = "/run/hostmesh"
UNIT_DIR = "/etc/systemd/system"
TMPFILES = "/etc/tmpfiles.d/hostmesh.conf"
MANIFEST = f"{STATE}/install.json"
AGENT_YAML = f"{ETC}/agent.yaml"
# the paths of ours that files refer to: moved under --root when it is not /
_OUR_PATHS = re.compile(r"(?<![\w./])(/usr/local/bin/hostmesh|/etc/hostmesh|/var/lib/hostmesh|/run/hostmesh)"
                        r"(?![\w.-])")
_NODE = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
MANIFEST_VERSION = 1


class InstallError(Exception):
    """A user-facing failure: nothing (more) was changed."""


# ---------------------------------------------------------------------------- what to install
@dataclass(frozen=True)
class Entry:
    """One thing install owns, at its path on the host (``--root`` not applied)."""

    path: str
    kind: str  # "dir", "file" or "link"
    mode: int = 0o644
    content: bytes = b""
    target: str = ""

    def record(self) -> dict:
        out = {"path": self.path, "kind": self.kind}
        if self.kind == "link":
            out["target"] = self.target
        else:
            out["mode"] = f"{self.mode:04o}"
        if self.kind == "file":
            out["sha256"] = sha256(self.content)
        return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def relocate(text: str, root: str) -> str:
    """Paths of ours in a file's text, moved under ``root`` (unchanged for /)."""
    if root == "/":
        return text
    return _OUR_PATHS.sub(lambda m: root.rstrip("/") + m.group(1), text)


def packaged(name: str) -> str:
    """A file from hostmesh/systemd/ (package data; the repository's systemd/ links to it)."""
    return resources.files("hostmesh").joinpath("systemd", name).read_text()


def check_node(name: str) -> str:
    if not name or not _NODE.match(name):
        raise InstallError(f"--node {name!r}: a node name is a lowercase DNS name (letters, digits, '-', '.'; "
                           f"e.g. worker1): it names the node's token and its workloads' node")
    return name


def parse_endpoints(value: str) -> list[str]:
    """``--control-plane HOST:PORT[,HOST:PORT...]``: each host an IPv4 address or a DNS name."""
    out = []
    for item in (v.strip() for v in (value or "").split(",")):
        host, sep, port = item.rpartition(":")
        valid_host = bool(host) and (_DNS_NAME.match(host) or _is_ipv4(host))
        if not sep or not valid_host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise InstallError(f"--control-plane: {item!r} is not HOST:PORT (e.g. 192.168.56.10:15010); "
                               f"separate replicas with commas")
        out.append(f"{host}:{int(port)}")
    if len(set(out)) != len(out):
        raise InstallError("--control-plane: lists an endpoint twice")
    return out


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        return False


def read_token(path: str, flag: str) -> bytes:
    """A bootstrap token from ``path``: the same rules the control plane and agent apply."""
    from controlplane.auth import MAX_TOKEN_CHARS, MIN_TOKEN_CHARS
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InstallError(f"{flag} {path}: cannot read the token: {getattr(exc, 'strerror', None) or exc}") from None
    if not MIN_TOKEN_CHARS <= len(text) <= MAX_TOKEN_CHARS or any(c.isspace() for c in text):
        raise InstallError(f"{flag} {path}: a token is {MIN_TOKEN_CHARS}-{MAX_TOKEN_CHARS} characters without "
                           f"whitespace")
    return (text + "\n").encode()


def read_bundle(path: str) -> bytes:
    from cryptography import x509
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InstallError(f"--root-bundle {path}: cannot read it: {exc.strerror}") from None
    try:
        if not x509.load_pem_x509_certificates(data):
            raise ValueError
    except ValueError:
        raise InstallError(f"--root-bundle {path}: not PEM certificates (the mesh root(s): `hostmesh ca bundle "
                           f"--ca-dir DIR` on the control plane prints them)") from None
    return data


def find_bin(explicit: str | None) -> str:
    """The hostmesh executable the units will run (through the /usr/local/bin/hostmesh link)."""
    candidates = [explicit] if explicit else [str(Path(sys.executable).with_name("hostmesh")),
                                              shutil.which("hostmesh") or ""]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.abspath(c)
    raise InstallError(f"--bin {explicit}: not an executable file" if explicit else
                       "cannot find the hostmesh executable next to this Python or on PATH; pass --bin PATH")


def agent_bootstrap(args, root: str, endpoints: list[str]) -> dict:
    """agent.yaml, with the bootstrap's field names (nodeagent/bootstrap.py)."""
    capture = {"mode": args.capture, "podCIDRs": args.pod_cidr or [], "meshCIDRs": args.mesh_cidr or []}
    if args.capture_cgroup:
        capture["cgroups"] = args.capture_cgroup
    if args.redirect_address:
        capture["redirectAddress"] = args.redirect_address
    if args.capture_instance:
        capture["instance"] = args.capture_instance
    auth = {"tokenFile": relocate(f"{ETC}/token", root), "rootBundle": relocate(f"{ETC}/root-bundle.pem", root)}
    if args.server_name:
        auth["serverName"] = args.server_name
    doc = {"node": args.node, "controlPlane": endpoints, "controlPlaneAuth": auth, "capture": capture,
           "admin": {"address": args.admin_address},
           "stateDir": relocate(STATE, root), "certDir": relocate(f"{RUN}/{args.node}/certs", root),
           "drainGrace": args.drain_grace}
    if args.workers:
        doc["workers"] = int(args.workers) if str(args.workers).isdigit() else args.workers
    return doc


def check_bootstrap(text: str) -> None:
    """Load the rendered agent.yaml with the agent's own loader: install never writes a
    bootstrap the agent would refuse."""
    from nodeagent import bootstrap
    from nodeagent.errors import ConfigError
    with tempfile.TemporaryDirectory(prefix="hostmesh-install-") as d:
        path = os.path.join(d, "agent.yaml")
        Path(path).write_text(text)
        try:
            bootstrap.build(bootstrap.load_file(path), {})
        except ConfigError as exc:
            raise InstallError("the agent would refuse this bootstrap; nothing was written:\n"
                               + str(exc).replace(path, "agent.yaml")) from None


def desired(args, root: str) -> list[Entry]:
    """Every directory, file and link the role needs, contents rendered; raises InstallError
    on bad input before anything is touched."""
    role = args.role
    unit = UNITS[role]
    entries = [Entry(ETC, "dir", 0o755), Entry(STATE, "dir", 0o700)]
    target, real_bin = find_bin(args.bin), root_path(root, BIN)
    # hostmesh itself installed as /usr/local/bin/hostmesh (pip into /usr/local): no link
    if not (os.path.isfile(real_bin) and not os.path.islink(real_bin) and os.path.samefile(real_bin, target)):
        entries.append(Entry(BIN, "link", target=target))
    entries.append(Entry(f"{UNIT_DIR}/{unit}", "file", 0o644, relocate(packaged(unit), root).encode()))
    entries.append(Entry(TMPFILES, "file", 0o644, relocate(packaged("hostmesh.conf"), root).encode()))
    if role == "agent":
        if not args.node:
            raise InstallError("--node NAME is required for the agent")
        check_node(args.node)
        endpoints = parse_endpoints(args.control_plane or "")
        if not args.token_file or not args.root_bundle:
            raise InstallError("--token-file and --root-bundle are required for the agent (the node's token and "
                               "the mesh root bundle, both from the control plane host)")
        token, bundle = read_token(args.token_file, "--token-file"), read_bundle(args.root_bundle)
        text = "# written by `hostmesh install`; reference: hostmesh/systemd/agent.yaml\n" + \
            yaml.safe_dump(agent_bootstrap(args, root, endpoints), sort_keys=False)
        check_bootstrap(text)
        entries += [Entry(f"{ETC}/token", "file", 0o600, token),
                    Entry(f"{ETC}/root-bundle.pem", "file", 0o644, bundle),
                    Entry(AGENT_YAML, "file", 0o644, text.encode())]
    else:
        entries += [Entry(f"{ETC}/config", "dir", 0o755), Entry(f"{ETC}/tokens", "dir", 0o700),
                    Entry(f"{STATE}/ca", "dir", 0o700)]
        entries += [Entry(f"{ETC}/tokens/{node}.token", "file", 0o600, token)
                    for node, token in node_tokens(args.node_tokens)]
        for san in args.tls_san or ():
            if not (_DNS_NAME.match(san) or _is_ipv4(san)):
                raise InstallError(f"--tls-san {san!r}: not a DNS name or an IPv4 address")
        sans = " ".join(f"--tls-san {s}" for s in args.tls_san or ())
        env = (f"# written by `hostmesh install`: extra flags of hostmesh-controlplane.service\n"
               f"HOSTMESH_CONTROLPLANE_ARGS={sans}\n")
        if getattr(args, "etcd", None):
            env += f"HOSTMESH_CONTROLPLANE_SOURCE={etcd_source(args)}\n"
        entries.append(Entry(f"{ETC}/controlplane.env", "file", 0o644, env.encode()))
    return entries


def etcd_source(args) -> str:
    """`--etcd EPS --replica NAME` for the unit, validated now (bad input writes nothing)."""
    from controlplane.etcd import EtcdError, parse_endpoints as parse_etcd
    try:
        endpoints = ",".join(parse_etcd(args.etcd))
    except EtcdError as exc:
        raise InstallError(f"--etcd: {exc}") from None
    replica = args.replica or ""
    if replica and not _DNS_NAME.match(replica):
        raise InstallError(f"--replica {replica!r}: use a lowercase DNS name")
    return f"--etcd {endpoints}" + (f" --replica {replica}" if replica else "")


def node_tokens(directory: str | None) -> list[tuple[str, bytes]]:
    if not directory:
        raise InstallError("--node-tokens DIR is required for the control plane (one <node>.token per node)")
    try:
        names = sorted(p for p in os.listdir(directory) if p.endswith(".token"))
    except OSError as exc:
        raise InstallError(f"--node-tokens {directory}: cannot list it: {exc.strerror}") from None
    if not names:
        raise InstallError(f"--node-tokens {directory}: no <node>.token files")
    out = []
    for name in names:
        node = name[:-len(".token")]
        if not _NODE.match(node):
            raise InstallError(f"--node-tokens {directory}/{name}: {node!r} is not a node name")
        out.append((node, read_token(os.path.join(directory, name), "--node-tokens")))
    return out


# ---------------------------------------------------------------------------- the file system
def root_path(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/")) if root != "/" else path


def parents(path: str) -> list[str]:
    """/a/b/c -> ['/a', '/a/b'] (outermost first)."""
    parts = Path(path).parent.parts[1:]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _current(real: str) -> tuple[str, bytes | str | None, int]:
    """(kind, content or link target, mode) of what is at a real path; kind '' when nothing."""
    try:
        st = os.lstat(real)
    except FileNotFoundError:
        return "", None, 0
    mode = st.st_mode & 0o7777
    if os.path.islink(real):
        return "link", os.readlink(real), mode
    if os.path.isdir(real):
        return "dir", None, mode
    return "file", Path(real).read_bytes(), mode


@dataclass
class Change:
    verb: str  # "create", "write", "chmod", "link", "remove", "rmdir", "keep", "run"
    path: str  # the real path (or the command line for "run")
    detail: str = ""
    entry: Entry | None = None
    argv: list[str] = field(default_factory=list)  # "run": the command

    def describe(self, dry_run: bool) -> str:
        past = {"create": "created", "write": "wrote", "chmod": "changed the mode of", "link": "linked",
                "remove": "removed", "rmdir": "removed", "keep": "kept", "run": "ran"}[self.verb]
        word = {"create": "create", "write": "write", "chmod": "change the mode of", "link": "link",
                "remove": "remove", "rmdir": "remove", "keep": "keep", "run": "run"}[self.verb]
        what = f"{'would ' + word if dry_run and self.verb != 'keep' else past} {self.path}"
        return f"{what} {self.detail}".rstrip()


def command(*argv: str) -> Change:
    return Change("run", " ".join(argv), argv=list(argv))


class Installer:
    """Plans and applies install/uninstall under a root; ``run`` executes commands (tests
    record them), ``systemd`` says whether systemd is the running init (None: look)."""

    def __init__(self, root: str = "/", *, force: bool = False, run: Callable[[list[str]], int] | None = None,
                 systemd: bool | None = None, start: bool = True, out: Callable[[str], None] = print) -> None:
        self.root = os.path.abspath(root)
        self.force = force
        self.run = run or _run
        self.start = start
        # systemd is the running init (sd_booted(3)'s test); tests pass it explicitly
        self.systemd = systemd if systemd is not None else (
            start and self.root == "/" and os.path.isdir("/run/systemd/system"))
        self.out = out

    def real(self, path: str) -> str:
        return root_path(self.root, path)

    # ------------------------------------------------------------------ manifest
    def load_manifest(self) -> dict:
        path = self.real(MANIFEST)
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            return {"version": MANIFEST_VERSION, "roles": {}}
        except (OSError, ValueError) as exc:
            raise InstallError(f"{path}: cannot read the install manifest ({exc}); fix or remove it") from None
        if data.get("version") != MANIFEST_VERSION or not isinstance(data.get("roles"), dict):
            raise InstallError(f"{path}: not a manifest this hostmesh understands (version {data.get('version')})")
        return data

    def owned(self, manifest: dict, *, except_role: str | None = None) -> dict[str, dict]:
        """path -> its record, over every installed role (but ``except_role``)."""
        return {e["path"]: e for role, r in manifest["roles"].items() if role != except_role
                for e in r["entries"]}

    # ------------------------------------------------------------------ install
    def plan_install(self, role: str, entries: list[Entry], manifest: dict) -> tuple[list[Change], list[dict]]:
        """The changes that make the tree match ``entries`` (conflicts raise), and the
        role's manifest records afterwards (directories only when install created them)."""
        ours = self.owned(manifest)
        changes: list[Change] = []
        records: list[dict] = []
        planned_dirs: set[str] = set()
        for entry in entries:
            for parent in parents(entry.path):
                if parent in planned_dirs:
                    continue
                kind, _, _ = _current(self.real(parent))
                if kind == "":
                    planned_dirs.add(parent)
                    changes.append(Change("create", self.real(parent), "(0755)", Entry(parent, "dir", 0o755)))
                    records.append(Entry(parent, "dir", 0o755).record())
                elif parent in ours and ours[parent]["kind"] == "dir":
                    records.append(ours[parent])
                    planned_dirs.add(parent)
            changes += self._entry_changes(entry, ours, records, planned_dirs)
        seen = set()
        unique = [r for r in records if not (r["path"] in seen or seen.add(r["path"]))]
        wanted = {r["path"] for r in unique}
        # what this role installed before and no longer needs (other roles' entries stay)
        old = manifest["roles"].get(role, {}).get("entries", [])
        others = self.owned(manifest, except_role=role)
        stale = [e for e in old if e["path"] not in wanted and e["path"] not in others]
        changes += self._removals(stale)
        return changes, unique

    def _entry_changes(self, entry: Entry, ours: dict, records: list, planned_dirs: set) -> list[Change]:
        real = self.real(entry.path)
        kind, content, mode = _current(real)
        mine = ours.get(entry.path)
        if entry.kind == "dir":
            if entry.path in planned_dirs:
                return []
            planned_dirs.add(entry.path)
            if kind == "":
                records.append(entry.record())
                return [Change("create", real, f"({entry.mode:04o})", entry)]
            if kind != "dir":
                raise InstallError(f"{real} exists and is not a directory; remove it first")
            if mine is not None:  # a directory we created: keep its mode as installed
                records.append(entry.record())
                if mode != entry.mode:
                    return [Change("chmod", real, f"({mode:04o} -> {entry.mode:04o})", entry)]
            return []
        records.append(entry.record())
        if entry.kind == "link":
            if kind == "link" and content == entry.target:
                return []
            if kind and not self.force and not (mine and mine.get("target") == content):
                raise InstallError(f"{real} exists and was not installed by hostmesh install; remove it, pass "
                                   f"--bin {real} to use it, or --force to replace it")
            return [Change("link", real, f"-> {entry.target}", entry)]
        if kind == "file" and content == entry.content:
            if mode == entry.mode:
                return []
            return [Change("chmod", real, f"({mode:04o} -> {entry.mode:04o})", entry)]
        if kind and kind != "file":
            raise InstallError(f"{real} exists and is not a regular file; remove it first")
        if kind and not self.force and not (mine and mine.get("sha256") == sha256(content)):
            why = "was changed since hostmesh install wrote it" if mine else "was not written by hostmesh install"
            raise InstallError(f"{real} {why}; pass --force to overwrite it")
        return [Change("write", real, f"({entry.mode:04o})", entry)]

    def apply(self, changes: list[Change]) -> None:
        for c in changes:
            e = c.entry
            if c.verb == "create":
                os.mkdir(c.path)
                os.chmod(c.path, e.mode)  # exactly this mode, whatever the umask
            elif c.verb == "chmod":
                os.chmod(c.path, e.mode)
            elif c.verb == "write":
                write_file(c.path, e.content, e.mode)
            elif c.verb == "link":
                tmp = f"{c.path}.hostmesh-new"
                if os.path.lexists(tmp):
                    os.unlink(tmp)
                os.symlink(e.target, tmp)
                os.replace(tmp, c.path)
            elif c.verb == "remove":
                os.unlink(c.path)
            elif c.verb == "rmdir":
                try:
                    os.rmdir(c.path)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    c = Change("keep", c.path, "(not empty)")
            elif c.verb == "run":
                rc = self.run(c.argv)
                if rc != 0:
                    raise InstallError(f"`{c.path}` failed (exit {rc}); nothing after it was done")
            self.out(c.describe(False))

    def install(self, role: str, entries: list[Entry], *, dry_run: bool = False) -> int:
        manifest = self.load_manifest()
        changes, records = self.plan_install(role, entries, manifest)
        new = json.loads(json.dumps(manifest))
        new["roles"][role] = {"unit": UNITS[role], "entries": records}
        manifest_text = json.dumps(new, indent=2, sort_keys=True) + "\n"
        manifest_changed = manifest != new
        if not changes and not manifest_changed:
            self.out(f"no change: hostmesh {role} is installed as asked (manifest {self.real(MANIFEST)})")
            return 0
        unit = UNITS[role]
        changes += [command("systemctl", "daemon-reload"), command("systemd-tmpfiles", "--create", TMPFILES),
                    command("systemctl", "enable", unit), command("systemctl", "restart", unit)] \
            if self.systemd else []
        if dry_run:
            for c in changes:
                self.out(c.describe(True))
            self.out(f"would record what was installed in {self.real(MANIFEST)}")
            return 0
        files = [c for c in changes if c.verb != "run"]
        self.apply(files)
        write_file(self.real(MANIFEST), manifest_text.encode(), 0o600)
        self.apply([c for c in changes if c.verb == "run"])
        if not self.systemd:
            self.out(self._start_hint(role))
        return 0

    def _start_hint(self, role: str) -> str:
        if self.root != "/":
            return f"installed under {self.root}; not started (systemctl is not used with --root)"
        if not self.start:
            return f"installed; not started (--no-start): systemctl daemon-reload && systemctl enable --now {UNITS[role]}"
        return f"installed; not started: systemd is not running here (no /run/systemd/system)"

    # ------------------------------------------------------------------ uninstall
    def _removals(self, records: list[dict]) -> list[Change]:
        """Files and links first, then directories deepest first; what is not ours any more
        (changed since install) or not empty is kept."""
        changes = []
        for r in records:
            if r["kind"] == "dir":
                continue
            real = self.real(r["path"])
            kind, content, _ = _current(real)
            if kind == "":
                continue
            if r["kind"] == "link" and kind == "link" and content == r["target"]:
                changes.append(Change("remove", real))
            elif r["kind"] == "file" and kind == "file" and sha256(content) == r["sha256"]:
                changes.append(Change("remove", real))
            else:
                changes.append(Change("keep", real, "(changed since hostmesh install wrote it: remove it yourself)"))
        removed = {c.path for c in changes if c.verb == "remove"}
        dirs = sorted((r for r in records if r["kind"] == "dir"), key=lambda r: r["path"].count("/"), reverse=True)
        gone_dirs: set[str] = set()
        manifest_real = self.real(MANIFEST)
        for r in dirs:
            real = self.real(r["path"])
            if not os.path.isdir(real):
                continue
            left = [os.path.join(real, n) for n in os.listdir(real)]
            left = [p for p in left if p not in removed and p not in gone_dirs and p != manifest_real]
            if left:
                changes.append(Change("keep", real, f"(not empty: {', '.join(sorted(os.path.basename(p) for p in left)[:5])})"))
            else:
                gone_dirs.add(real)
                changes.append(Change("rmdir", real))
        return changes

    def uninstall(self, roles: list[str] | None, *, dry_run: bool = False, remove_capture: bool | None = None) -> int:
        manifest = self.load_manifest()
        installed = list(manifest["roles"])
        if not roles and not installed:
            self.out(f"nothing to uninstall: hostmesh install left no manifest under {self.root} "
                     f"({self.real(MANIFEST)})")
            return 0
        roles = roles or installed
        missing = [r for r in roles if r not in installed]
        if missing:
            raise InstallError(f"the {' and '.join(missing)} role is not installed under {self.root} "
                               f"(installed: {', '.join(installed) or 'nothing'}; see {self.real(MANIFEST)})")
        before = [command("systemctl", "disable", "--now", UNITS[role]) for role in roles] if self.systemd else []
        if "agent" in roles and (self.systemd if remove_capture is None else remove_capture):
            binary = self.real(BIN) if os.path.exists(self.real(BIN)) else find_bin(None)
            before.append(command(binary, "agent", "--config", self.real(AGENT_YAML), "--uninstall"))
        remaining = {k: v for k, v in manifest["roles"].items() if k not in roles}
        keep = {e["path"] for r in remaining.values() for e in r["entries"]}
        records = [e for role in roles for e in manifest["roles"][role]["entries"] if e["path"] not in keep]
        seen: set[str] = set()
        records = [e for e in records if not (e["path"] in seen or seen.add(e["path"]))]
        after = [command("systemctl", "daemon-reload")] if self.systemd else []
        if dry_run:
            for c in before + self._removals(records) + after:
                self.out(c.describe(True))
            return 0
        self.apply(before)  # the unit stopped and capture removed, or nothing is removed
        removals = self._removals(records)  # after: removing capture takes the state dir's lock (a file)
        if remaining:
            write_file(self.real(MANIFEST), (json.dumps({**manifest, "roles": remaining}, indent=2, sort_keys=True)
                                             + "\n").encode(), 0o600)
        else:
            os.unlink(self.real(MANIFEST))
        self.apply(removals)
        self.apply(after)
        if "agent" in roles and not any(c.argv[-1:] == ["--uninstall"] for c in before):
            self.out("capture left as it is (no systemd here): if an agent ran, remove its capture with "
                     "`hostmesh agent --config FILE --uninstall` (or run uninstall with --remove-capture)")
        return 0


def write_file(path: str, data: bytes, mode: int) -> None:
    """Atomically, with exactly ``mode`` (a token is never readable by others, even briefly)."""
    tmp = f"{path}.hostmesh-new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _run(argv: list[str]) -> int:
    return subprocess.run(argv, stdin=subprocess.DEVNULL).returncode


# ---------------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser("install", help="install the agent (or the control plane) on this host under systemd")
    p.add_argument("--role", choices=ROLES, default="agent", help="agent (default) or controlplane")
    p.add_argument("--node", help="agent: this node's name (lowercase DNS name)")
    p.add_argument("--control-plane", metavar="HOST:PORT[,HOST:PORT...]",
                   help="agent: the control plane's gRPC endpoint(s) (15010), replicas in failover order")
    p.add_argument("--token-file", metavar="SRC", help="agent: this node's bootstrap token (copied to "
                                                       "/etc/hostmesh/token, 0600)")
    p.add_argument("--root-bundle", metavar="SRC", help="agent: the mesh root certificate(s), PEM "
                                                        "(`hostmesh ca bundle` on the control plane)")
    p.add_argument("--server-name", help="agent: the name to verify on the control plane's certificate "
                                         "(default: the host dialed)")
    p.add_argument("--capture", choices=["iptables", "ebpf"], default="iptables", help="agent: capture backend")
    p.add_argument("--pod-cidr", action="append", metavar="CIDR", help="agent: this node's workload addresses "
                                                                       "(repeatable)")
    p.add_argument("--mesh-cidr", action="append", metavar="CIDR",
                   help="agent: destinations that belong to the mesh: service VIPs, every node's pod CIDR "
                        "(repeatable)")
    p.add_argument("--capture-cgroup", action="append", metavar="DIR",
                   help="agent, ebpf: a cgroup v2 directory whose processes are captured (repeatable)")
    p.add_argument("--redirect-address", metavar="IP", help="agent, ebpf: where pods reach the node's proxy")
    p.add_argument("--capture-instance", metavar="NAME", help="agent, ebpf: names the pins "
                                                             "(/sys/fs/bpf/hostmesh/NAME)")
    p.add_argument("--admin-address", default="127.0.0.1:15000", help="agent: admin endpoint (default %(default)s)")
    p.add_argument("--drain-grace", default="10s", help="agent: how long a stop drains (default %(default)s; "
                                                        "the unit's TimeoutStopSec=30s stays above it)")
    p.add_argument("--workers", help="agent: proxy worker processes (auto or a number; default: the agent's)")
    p.add_argument("--node-tokens", metavar="DIR", help="controlplane: directory of <node>.token files to copy "
                                                        "into /etc/hostmesh/tokens")
    p.add_argument("--etcd", metavar="HOST:PORT[,...]",
                   help="controlplane: read config from etcd instead of /etc/hostmesh/config (HA replicas)")
    p.add_argument("--replica", help="controlplane, with --etcd: this replica's name in leader election")
    p.add_argument("--tls-san", action="append", metavar="NAME",
                   help="controlplane: a DNS name or IP agents dial (repeatable; goes into the TLS certificate)")
    _common(p)
    p.add_argument("--bin", metavar="PATH", help="the hostmesh executable /usr/local/bin/hostmesh links to "
                                                 "(default: the one running this command)")
    p.add_argument("--force", action="store_true", help="overwrite files install did not write (or that changed)")
    p = sub.add_parser("uninstall", help="remove exactly what `hostmesh install` put on this host")
    p.add_argument("--role", choices=ROLES, action="append", help="only this role (default: every installed one)")
    _common(p)
    p.add_argument("--remove-capture", action=argparse.BooleanOptionalAction, default=None,
                   help="remove the agent's capture (`hostmesh agent --uninstall`) first; default: when systemd "
                        "runs here")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="/", help="install under this directory as if it were / (default /); "
                                               "never calls systemctl")
    p.add_argument("--dry-run", action="store_true", help="print every change; change nothing")
    p.add_argument("--no-start", action="store_true", help="do not call systemctl or systemd-tmpfiles")


def run(args) -> int:
    """`hostmesh install` and `hostmesh uninstall`; InstallError carries the message for the user."""
    if args.root != "/" and not os.path.isdir(args.root):
        raise InstallError(f"--root {args.root}: not a directory")
    if os.path.abspath(args.root) == "/" and os.geteuid() != 0 and not args.dry_run:
        raise InstallError(f"{args.command} into / needs root (sudo hostmesh {args.command} ...); "
                           f"--dry-run shows what it would do")
    if args.command == "install":
        inst = Installer(args.root, force=args.force, start=not args.no_start)
        entries = desired(args, inst.root)
        try:
            return inst.install(args.role, entries, dry_run=args.dry_run)
        except OSError as exc:
            raise InstallError(f"{exc.filename or ''}: {exc.strerror or exc}; the install is incomplete: run it "
                               f"again once fixed") from None
    inst = Installer(args.root, start=not args.no_start)
    try:
        return inst.uninstall(args.role, dry_run=args.dry_run, remove_capture=args.remove_capture)
    except OSError as exc:
        raise InstallError(f"{exc.filename or ''}: {exc.strerror or exc}") from None


__all__ = ["register", "run", "InstallError", "Installer", "desired", "relocate"]
