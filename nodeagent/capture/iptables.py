"""iptables capture backend: nat-table REDIRECT into the agent's listeners.

What it installs (nat table only, our own chains only)::

    -A PREROUTING -m comment --comment hostmesh -j HOSTMESH-PREROUTING     (inserted at the top)
    -A HOSTMESH-PREROUTING -m mark --mark <socket_mark> -j RETURN
    -A HOSTMESH-PREROUTING -s <pod cidr> -p tcp -j HOSTMESH-OUTBOUND         (per pod CIDR)
    -A HOSTMESH-PREROUTING -s <pod cidr> -j RETURN                           (per pod CIDR)
    -A HOSTMESH-PREROUTING -d <pod cidr> -p tcp -j HOSTMESH-INBOUND          (per pod CIDR)
    -A HOSTMESH-OUTBOUND -d <mesh cidr> -p tcp -j REDIRECT --to-ports 15001  (per mesh CIDR)
    -A HOSTMESH-INBOUND -p tcp -m tcp --dport <excluded> -j RETURN           (per excluded port)
    -A HOSTMESH-INBOUND -p tcp -j REDIRECT --to-ports 15006

so a TCP connection a local pod opens toward the mesh (a service VIP or any node's pod,
including a pod on this very node) lands on 15001; one arriving from elsewhere (another
node, the fabric) for a local pod lands on 15006; a local pod is never sent down the inbound
path, and the proxy's own marked packets are left alone.

Why REDIRECT + SO_ORIGINAL_DST, not TPROXY
------------------------------------------
* Fail-closed by construction. REDIRECT rewrites the destination to this host; when nothing
  listens on 15001/15006 the local TCP stack answers RST, so a dead proxy means refused
  connections, never a plaintext bypass. TPROXY needs a policy route + fwmark rule to make
  the packets local; lose either and traffic is forwarded untouched.
* No policy-routing state to leak: no `ip rule`, no extra routing table, nothing outside
  the nat table that remove() has to find again.
* One proxy code path: the proxy asks conntrack for the pre-NAT destination with
  getsockopt(SOL_IP, SO_ORIGINAL_DST). The eBPF backend (later) can answer the same
  getsockopt from a cgroup/getsockopt program, so the proxy never knows which backend runs.
* Known follow-up: REDIRECT hides the client's address from a *local* pod (the proxy
  connects from the node). Preserving source IPs toward local pods needs TPROXY /
  IP_TRANSPARENT on the inbound side; it is deliberately out of this first backend.

REDIRECT and address-less interfaces (important for the CNI / lab)
-----------------------------------------------------------------
REDIRECT (and nft `redirect`) rewrites the destination to the *primary IPv4 address of
the interface the packet arrived on*, and DROPS the packet when that interface has none.
A point-to-point CNI whose node-side pod veths carry no address therefore gets every
captured SYN from its pods silently dropped: still fail-closed (connections time out),
but capture never works. The node-side veths need an address; the pods' gateway
169.254.1.1/32 on every node-side veth is the usual choice (it may sit on many
interfaces). verify() reports each pod route whose interface lacks an IPv4 address.

The mark exclusion comes first in HOSTMESH-PREROUTING. The proxy's own connections leave
through OUTPUT, which this backend does not capture, and skb->mark is cleared whenever a
packet crosses into another namespace (veth), so today the rule is a guard for marked
packets that re-enter PREROUTING inside this namespace (loopback, re-injection, a future
tunnel device) rather than something the lab can exercise from a pod.

Why there is no HOSTMESH-OUTPUT (host-process capture) yet
----------------------------------------------------------
A chain holding only the mark exclusion would do nothing, yet it costs a jump on every
locally generated connection and creates the nat OUTPUT base chain (one more object to
leave behind). Host-process capture needs its own design (which processes, loop
avoidance via owner/cgroup, DNS); adding the chain then is a change to `desired_state()`
only, because reconcile already deletes HOSTMESH-* chains and hostmesh-commented jumps
that are no longer desired, so upgrades and downgrades converge.

How reconcile works
-------------------
1. `iptables-save -t nat` is parsed; what is ours (chains named HOSTMESH-*, rules outside
   them carrying the comment "hostmesh" or jumping into a HOSTMESH-* chain) is extracted.
2. `build_transition(current, target)` (pure) writes one iptables-restore script for the
   nat table: `:HOSTMESH-X - [0:0]` declares-and-flushes only our chains, our changed
   chains are refilled, stale HOSTMESH-* chains are deleted, and the jump is touched only
   when it is not exactly one copy (crash leftovers: every copy is deleted and one is
   inserted at the top). Builtin chains are never declared, so nothing that is not ours
   is flushed, reordered or changed.
3. It is applied with `iptables-restore --noflush`: one atomic transaction (nft: one
   netlink batch checked against the ruleset generation). Already-correct state writes
   nothing.
4. The result is read back and compared; on mismatch the previous state of our objects is
   restored (same mechanism) and CaptureError is raised. When restore itself fails (no
   iptables, no nat table, no REDIRECT) the transaction was never committed: nothing new
   is installed and the error says what is missing.

Position of the jump: it is inserted at the top of nat PREROUTING, so capture sees the
original destination before any other DNAT (e.g. kube-proxy's KUBE-SERVICES) rewrites it.
An existing single copy is left wherever it is: reconcile never reorders rules, and a rule
someone later inserts above ours is their call (verify() does not flag it).

remove() is the transition to "nothing of ours". With the nf_tables backend the nat table
and its base chains spring into existence on first use and are NOT removed when emptied,
so iptables-save would show an empty `*nat` forever after. (Careful when checking this by
hand: `iptables-save -t nat` prints an empty *nat block even when the table does not exist;
plain `iptables-save` and `nft list ruleset` show the truth.) remove() therefore also deletes
the nat table when it is completely empty, with NLM_F_NONREC delete messages in one
nfnetlink batch: the kernel itself refuses (EBUSY) if any chain still holds a rule or the
table holds anything else, so a rule another tool adds concurrently is never lost.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from nodeagent.capture import netns as nsmod
from nodeagent.capture.base import Capture, CaptureSpec, CaptureStatus
from nodeagent.errors import CaptureError

TABLE = "nat"
CHAIN_PREFIX = "HOSTMESH-"
CHAIN_PREROUTING = "HOSTMESH-PREROUTING"
CHAIN_OUTBOUND = "HOSTMESH-OUTBOUND"
CHAIN_INBOUND = "HOSTMESH-INBOUND"
COMMENT = "hostmesh"
JUMP = ("PREROUTING", f"-m comment --comment {COMMENT} -j {CHAIN_PREROUTING}")
BUILTIN_CHAINS = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")


# --------------------------------------------------------------------------------------
# pure part: desired rules, iptables-save parsing, transition scripts
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Owned:
    """What of the nat table is ours: our chains (rule specs in order) and the jumps into them.

    Rule specs are in iptables-save's canonical spelling, without the leading `-A CHAIN `.
    """

    chains: tuple[tuple[str, tuple[str, ...]], ...] = ()
    jumps: tuple[tuple[str, str], ...] = ()   # (builtin or foreign chain, rule spec)

    @property
    def chain_map(self) -> dict[str, tuple[str, ...]]:
        return dict(self.chains)

    @property
    def empty(self) -> bool:
        return not self.chains and not self.jumps

    def to_dict(self) -> dict[str, Any]:
        return {"chains": {name: list(rules) for name, rules in self.chains},
                "jumps": [f"-A {chain} {spec}" for chain, spec in self.jumps]}


NOTHING = Owned()


def _net_opt(flag: str, cidr: str) -> str:
    # iptables-save omits a match on 0.0.0.0/0, so the canonical spelling does too
    return "" if cidr == "0.0.0.0/0" else f"{flag} {cidr} "


def desired_state(spec: CaptureSpec) -> Owned:
    """The chains and jump `spec` calls for, spelled exactly as iptables-save prints them."""
    pre = [f"-m mark --mark 0x{spec.socket_mark:x} -j RETURN"]
    pre += [f"{_net_opt('-s', p)}-p tcp -j {CHAIN_OUTBOUND}" for p in spec.pod_cidrs]
    pre += [f"{_net_opt('-s', p)}-j RETURN" for p in spec.pod_cidrs]
    pre += [f"{_net_opt('-d', p)}-p tcp -j {CHAIN_INBOUND}" for p in spec.pod_cidrs]
    out = [f"{_net_opt('-d', m)}-p tcp -j REDIRECT --to-ports {spec.outbound_port}"
           for m in spec.mesh_cidrs]
    inb = [f"-p tcp -m tcp --dport {p} -j RETURN" for p in spec.exclude_inbound_ports]
    inb.append(f"-p tcp -j REDIRECT --to-ports {spec.inbound_port}")
    return Owned(chains=((CHAIN_PREROUTING, tuple(pre)), (CHAIN_OUTBOUND, tuple(out)),
                         (CHAIN_INBOUND, tuple(inb))),
                 jumps=(JUMP,))


@dataclass
class SavedTable:
    name: str
    chains: dict[str, str] = field(default_factory=dict)        # chain -> policy ("-" for user chains)
    rules: dict[str, list[str]] = field(default_factory=dict)   # chain -> rule specs in order


_COUNTERS = re.compile(r"^\[\d+:\d+\]\s+")


def parse_save(text: str) -> dict[str, SavedTable]:
    """Parse iptables-save output (with or without -c counters) into tables, chains, rules."""
    tables: dict[str, SavedTable] = {}
    cur: SavedTable | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            cur = tables.setdefault(line[1:], SavedTable(line[1:]))
            continue
        if line == "COMMIT":
            cur = None
            continue
        if cur is None:
            raise CaptureError(f"iptables-save output line {lineno} is outside a table: {raw!r}")
        if line.startswith(":"):
            parts = line[1:].split()
            if len(parts) < 2:
                raise CaptureError(f"iptables-save output line {lineno}: bad chain line {raw!r}")
            cur.chains[parts[0]] = parts[1]
            cur.rules.setdefault(parts[0], [])
            continue
        line = _COUNTERS.sub("", line)
        if line.startswith("-A "):
            parts = line.split(None, 2)
            chain = parts[1]
            cur.rules.setdefault(chain, []).append(parts[2] if len(parts) > 2 else "")
            cur.chains.setdefault(chain, "-")
            continue
        raise CaptureError(f"iptables-save output line {lineno} not understood: {raw!r}")
    return tables


def _tokens(spec: str) -> list[str]:
    try:
        return shlex.split(spec)
    except ValueError:
        return spec.split()


def _is_ours_outside(spec: str) -> bool:
    """A rule in a chain that is not ours, but belongs to us: our comment or a jump into our chains."""
    toks = _tokens(spec)
    for i, tok in enumerate(toks[:-1]):
        nxt = toks[i + 1]
        if tok == "--comment" and nxt == COMMENT:
            return True
        if tok in ("-j", "-g", "--jump", "--goto") and nxt.startswith(CHAIN_PREFIX):
            return True
    return False


def owned_state(table: SavedTable | None) -> Owned:
    """Extract what is ours from a parsed nat table (None: the table does not exist)."""
    if table is None:
        return NOTHING
    chains = tuple((name, tuple(table.rules.get(name, ())))
                   for name in table.chains if name.startswith(CHAIN_PREFIX))
    jumps = tuple((name, spec)
                  for name, specs in table.rules.items() if not name.startswith(CHAIN_PREFIX)
                  for spec in specs if _is_ours_outside(spec))
    return Owned(chains=chains, jumps=jumps)


def build_transition(current: Owned, target: Owned) -> str | None:
    """An `iptables-restore --noflush` script taking our part of nat from `current` to `target`.

    Only HOSTMESH-* chains are declared (declaring flushes them under --noflush); builtin and
    foreign chains are only touched by deleting/inserting our own jump rules, and only when
    they are not already exactly right. Returns None when nothing needs to change.
    """
    cur, tgt = current.chain_map, target.chain_map
    changed = [name for name, rules in target.chains if cur.get(name) != rules]
    stale = [name for name in cur if name not in tgt]
    jumps_change = list(current.jumps) != list(target.jumps)
    if not changed and not stale and not jumps_change:
        return None
    lines = [f"*{TABLE}"]
    lines += [f":{name} - [0:0]" for name in changed + stale]
    if jumps_change:
        # every current copy goes (deleted by spec: -D removes the first match each time) ...
        lines += [f"-D {chain} {spec}" for chain, spec in current.jumps]
    for name in changed:
        lines += [f"-A {name} {rule}".rstrip() for rule in tgt[name]]
    if jumps_change:
        # ... and the wanted ones go to the top, in order (see module docstring on position)
        lines += [f"-I {chain} 1 {spec}" for chain, spec in reversed(target.jumps)]
    lines += [f"-X {name}" for name in stale]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def compare(current: Owned, target: Owned) -> list[str]:
    """Human-readable differences between what is installed and what is desired."""
    problems: list[str] = []
    cur, tgt = current.chain_map, target.chain_map
    for name, want in target.chains:
        have = cur.get(name)
        if have is None:
            problems.append(f"chain {name} is missing from the {TABLE} table")
            continue
        if have == want:
            continue
        missing = [r for r in want if r not in have]
        extra = [r for r in have if r not in want]
        problems += [f"chain {name}: rule missing: -A {name} {r}" for r in missing]
        problems += [f"chain {name}: unexpected rule: -A {name} {r}" for r in extra]
        if not missing and not extra:
            problems.append(f"chain {name}: rules are out of order or duplicated")
    for name in cur:
        if name not in tgt:
            problems.append(f"stale chain {name} (not part of the desired state)")
    for chain, spec in target.jumps:
        n = sum(1 for j in current.jumps if j == (chain, spec))
        if n == 0:
            problems.append(f"jump rule missing, capture is inactive: -A {chain} {spec}")
        elif n > 1:
            problems.append(f"jump rule present {n} times: -A {chain} {spec}")
    for chain, spec in current.jumps:
        if (chain, spec) not in target.jumps:
            problems.append(f"unexpected rule referring to hostmesh: -A {chain} {spec}")
    return problems


def explain_failure(stderr: str) -> str:
    """Turn iptables error output into what is missing on this host."""
    s = stderr
    if "REDIRECT" in s:
        return ("the REDIRECT target is unavailable (userspace extension libxt_REDIRECT or "
                "kernel support CONFIG_NETFILTER_XT_TARGET_REDIRECT / CONFIG_NFT_REDIR missing)")
    if ("Table does not exist" in s or "can't initialize iptables table" in s
            or ("nat" in s and "not supported" in s)):
        return ("the nat table is unavailable (kernel lacks NAT support: CONFIG_NF_NAT with "
                "CONFIG_IP_NF_NAT / CONFIG_NFT_NAT)")
    for ext, cfg in (("comment", "CONFIG_NETFILTER_XT_MATCH_COMMENT"),
                     ("mark", "CONFIG_NETFILTER_XT_MATCH_MARK"),
                     ("tcp", "CONFIG_NETFILTER_XT_MATCH_TCPMSS/xt_tcpudp")):
        if f"match `{ext}'" in s or f"match \"{ext}\"" in s:
            return f"the iptables '{ext}' match is unavailable ({cfg})"
    if "Permission denied" in s or "Operation not permitted" in s:
        return "not permitted: iptables needs CAP_NET_ADMIN (run the agent as root)"
    return "iptables-restore rejected the ruleset"


# --------------------------------------------------------------------------------------
# nf_tables: delete the nat table once it is completely empty (see module docstring)
# --------------------------------------------------------------------------------------

_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_NFTABLES = 10
_NFNL_MSG_BATCH_BEGIN, _NFNL_MSG_BATCH_END = 0x10, 0x11
_NFT_MSG_DELTABLE, _NFT_MSG_GETCHAIN, _NFT_MSG_DELCHAIN = 2, 4, 5
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_NONREC, _NLM_F_DUMP = 0x1, 0x4, 0x100, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NFTA_TABLE_NAME = 1
_NFTA_CHAIN_TABLE, _NFTA_CHAIN_NAME = 1, 3


def _nla(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


def _nfmsg(kind: int, flags: int, seq: int, family: int, payload: bytes = b"", res_id: int = 0) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + payload
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def _attrs(data: bytes) -> dict[int, bytes]:
    out, i = {}, 0
    while i + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, i)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[i + 4:i + length]
        i += (length + 3) & ~3
    return out


def _messages(data: bytes):
    i = 0
    while i + 16 <= len(data):
        length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", data, i)
        if length < 16:
            return
        yield kind, seq, data[i + 16:i + length]
        i += (length + 3) & ~3


def drop_nat_table_if_empty() -> bool:
    """In the calling thread's netns: delete `table ip nat` iff it holds nothing. True if deleted.

    One nfnetlink batch: NLM_F_NONREC DELCHAIN for each of its (empty) chains, then
    NLM_F_NONREC DELTABLE. The kernel refuses with EBUSY, and the whole batch is aborted,
    if a chain still has rules or references or the table still holds anything.
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        sock.settimeout(2.0)
        kind = (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETCHAIN
        sock.send(_nfmsg(kind, _NLM_F_REQUEST | _NLM_F_DUMP, 1, socket.AF_INET))
        chains: list[str] = []
        done = False
        while not done:
            for mkind, _seq, body in _messages(sock.recv(1 << 16)):
                if mkind == _NLMSG_DONE:
                    done = True
                    break
                if mkind == _NLMSG_ERROR:
                    return False
                attrs = _attrs(body[4:])
                if attrs.get(_NFTA_CHAIN_TABLE, b"").rstrip(b"\0") == TABLE.encode():
                    chains.append(attrs[_NFTA_CHAIN_NAME].rstrip(b"\0").decode())
        seq = 100
        flags = _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_NONREC
        batch = _nfmsg(_NFNL_MSG_BATCH_BEGIN, _NLM_F_REQUEST, seq, socket.AF_UNSPEC,
                       res_id=_NFNL_SUBSYS_NFTABLES)
        table_attr = _nla(_NFTA_TABLE_NAME, TABLE.encode() + b"\0")
        expected = []
        for name in chains:
            seq += 1
            expected.append(seq)
            batch += _nfmsg((_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_DELCHAIN, flags, seq, socket.AF_INET,
                            _nla(_NFTA_CHAIN_TABLE, TABLE.encode() + b"\0")
                            + _nla(_NFTA_CHAIN_NAME, name.encode() + b"\0"))
        seq += 1
        expected.append(seq)
        batch += _nfmsg((_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_DELTABLE, flags, seq, socket.AF_INET,
                        table_attr)
        seq += 1
        batch += _nfmsg(_NFNL_MSG_BATCH_END, _NLM_F_REQUEST, seq, socket.AF_UNSPEC,
                        res_id=_NFNL_SUBSYS_NFTABLES)
        sock.send(batch)
        results: dict[int, int] = {}
        while len(results) < len(expected):
            try:
                data = sock.recv(1 << 16)
            except (TimeoutError, socket.timeout):
                break
            for mkind, mseq, body in _messages(data):
                if mkind == _NLMSG_ERROR:
                    results[mseq] = struct.unpack_from("=i", body)[0]
        # all-or-nothing: any EBUSY (not empty) or ENOENT (gone meanwhile) aborted the batch
        return all(results.get(s) == 0 for s in expected)
    finally:
        sock.close()


# --------------------------------------------------------------------------------------
# the backend
# --------------------------------------------------------------------------------------


class IptablesCapture(Capture):
    name = "iptables"
    ATTEMPTS = 3

    def __init__(self, spec: CaptureSpec, *, netns: str | None = None) -> None:
        super().__init__(spec, netns=netns)
        self.desired = desired_state(spec)
        self._lock = threading.RLock()
        self._version: str | None = None

    # -- tools ----------------------------------------------------------------------------
    def _tool(self, name: str) -> str:
        path = shutil.which(name)
        if not path:
            raise CaptureError(f"iptables capture: {name} not found on PATH; install the iptables "
                               f"package (nf_tables or legacy backend)")
        return path

    def _run(self, argv: list[str], input: str | None = None):
        return nsmod.run(argv, netns=self.netns, input=input)

    @property
    def version(self) -> str:
        """e.g. 'iptables-save v1.8.9 (nf_tables)'."""
        if self._version is None:
            proc = self._run([self._tool("iptables-save"), "-V"])
            self._version = (proc.stdout or proc.stderr).strip()
        return self._version

    @property
    def nft_backend(self) -> bool:
        return "nf_tables" in self.version

    def _read(self) -> tuple[SavedTable | None, Owned]:
        """The nat table as iptables-save shows it, and our part of it.

        Note: with the nf_tables backend `iptables-save -t nat` prints an empty *nat block even
        when the table does not exist, so the table is never None here; plain `iptables-save`
        would tell the difference, at the cost of dumping every table.
        """
        proc = self._run([self._tool("iptables-save"), "-t", TABLE])
        if proc.returncode != 0:
            raise CaptureError(f"iptables capture: cannot read the {TABLE} table: "
                               f"{explain_failure(proc.stderr)}: {proc.stderr.strip()}")
        table = parse_save(proc.stdout).get(TABLE)
        return table, owned_state(table)

    def _apply(self, script: str) -> None:
        proc = self._run([self._tool("iptables-restore"), "--noflush", "--wait", "5"], input=script)
        if proc.returncode != 0:
            raise CaptureError(f"iptables capture: {explain_failure(proc.stderr)}; "
                               f"iptables-restore said: {proc.stderr.strip()}")

    def _reconcile(self, target: Owned) -> None:
        """Transition our part of nat to `target` (one atomic iptables-restore, if anything differs)."""
        last: CaptureError | None = None
        for _ in range(self.ATTEMPTS):
            _, current = self._read()
            script = build_transition(current, target)
            if script is None:
                return
            try:
                self._apply(script)
                return
            except CaptureError as exc:
                last = exc
                # retry only if someone changed our objects underneath us meanwhile
                _, now = self._read()
                if now == current:
                    raise
        assert last is not None
        raise last

    def _drop_empty_table(self) -> bool:
        if not self.nft_backend:
            return False
        try:
            table, _ = self._read()
            if table is None or any(table.rules.values()) or any(
                    c not in BUILTIN_CHAINS for c in table.chains):
                return False
            return nsmod.call_in(self.netns, drop_nat_table_if_empty)
        except (OSError, CaptureError):
            return False  # cosmetic: an empty nat table has no behaviour

    # -- interface --------------------------------------------------------------------------
    def install(self) -> None:
        with self._lock:
            try:
                self._tool("iptables-restore")
                self._tool("iptables-save")
            except CaptureError as exc:
                raise CaptureError(f"{exc}; nothing was installed") from None
            _, before = self._read()
            try:
                self._reconcile(self.desired)
                _, now = self._read()
            except CaptureError:
                # iptables-restore is atomic, so normally nothing changed; make sure of it
                self._roll_back(before)
                raise
            problems = compare(now, self.desired)
            if problems:
                note = self._roll_back(before)
                raise CaptureError("iptables capture: rules did not read back as written, rolled back: "
                                   + "; ".join(problems) + note)
            self.last_status = CaptureStatus(ok=True, problems=[], checked_at=time.time())

    def _roll_back(self, before: Owned) -> str:
        """Return our part of nat to `before` (nothing, on a first install). '' or a failure note."""
        try:
            self._reconcile(before)
            if before.empty:
                self._drop_empty_table()
        except CaptureError as exc:
            return f"; rollback failed too: {exc}"
        return ""

    def leftovers(self) -> bool:
        with self._lock:
            return self._read()[1] != NOTHING

    def remove(self) -> None:
        with self._lock:
            self._reconcile(NOTHING)
            self._drop_empty_table()
            self.last_status = None

    def verify(self) -> CaptureStatus:
        with self._lock:
            try:
                _, now = self._read()
                problems = compare(now, self.desired)
            except CaptureError as exc:
                problems = [str(exc)]
            problems += self._interface_problems()
            status = CaptureStatus(ok=not problems, problems=problems, checked_at=time.time())
            self.last_status = status
            return status

    def _interface_problems(self) -> list[str]:
        """Pod routes whose interface has no IPv4 address: REDIRECT drops what arrives there."""
        ip = shutil.which("ip")
        if not ip:
            return []
        try:
            routes = json.loads(self._run([ip, "-j", "-4", "route", "show", "table", "main"]).stdout or "[]")
            addrs = json.loads(self._run([ip, "-j", "-4", "addr", "show"]).stdout or "[]")
        except (ValueError, CaptureError):
            return []
        with_v4 = {a.get("ifname") for a in addrs if a.get("addr_info")}
        pods = [ipaddress.ip_network(c) for c in self.spec.pod_cidrs]
        problems = []
        for r in routes:
            dev, dst = r.get("dev"), r.get("dst")
            if not dev or r.get("gateway") or not dst or dst == "default":
                continue
            try:
                net = ipaddress.ip_network(dst, strict=False)
            except ValueError:
                continue
            if any(net.subnet_of(p) for p in pods) and dev not in with_v4:
                problems.append(
                    f"interface {dev} (route to pod {dst}) has no IPv4 address: REDIRECT drops "
                    f"packets arriving on an interface without one, so that pod's captured "
                    f"connections are blackholed; give the node-side veth an address "
                    f"(e.g. 169.254.1.1/32)")
        return problems

    def describe(self) -> dict:
        with self._lock:
            info: dict[str, Any] = {
                "backend": self.name,
                "netns": self.netns,
                "spec": self.spec.to_dict(),
                "table": TABLE,
                "desired": self.desired.to_dict(),
                "last_verification": self.last_status.to_dict() if self.last_status else None,
            }
            try:
                info["iptables"] = self.version
                _, now = self._read()
                info["installed"] = now.to_dict()
            except CaptureError as exc:
                info["installed"] = None
                info["error"] = str(exc)
            return info
