"""Host preflight behind `hostmesh check`: which kernel features and tools this host has.

Every probe is real (a throwaway network namespace gets the iptables rules and the policy
routing, the kernel gets minimal eBPF programs) and none of them touches the root network
namespace's firewall or routes. Each probe:

- has a timeout (subprocesses are killed with their process group),
- never raises out of run_checks(): an exception becomes a "missing" result naming it,
- removes what it created (namespaces named ``hm-check-<pid>[-<probe>]``, eBPF fds) even
  when it fails; namespaces left by a crashed earlier run (dead pid) are removed first.

Required items (a missing one makes ``exit_code`` 1): privileges (CAP_NET_ADMIN), netns,
iptables with REDIRECT, mark, owner and TPROXY, policy routing (TPROXY needs it), cgroup v2.
eBPF items are optional: the agent falls back to the iptables capture backend.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

from nodeagent import cgroups

OK = "ok"
MISSING = "missing"
DEGRADED = "degraded"

NETNS_PREFIX = "hm-check-"
NETNS_DIR = "/run/netns"

# timeouts (seconds)
CMD_TIMEOUT = 5.0
PYROUTE2_TIMEOUT = 15.0
BCC_TIMEOUT = 30.0


@dataclass(frozen=True)
class CheckResult:
    name: str  # short id, e.g. "iptables-tproxy"
    status: str  # "ok" | "missing" | "degraded"
    detail: str  # what was found, concrete (versions, paths)
    hint: str  # what to do about it when not ok ("" when ok)
    required: bool  # a missing required item makes the exit code non-zero


class ProbeError(Exception):
    """A probe could not run or the host refused what it tried."""


# --------------------------------------------------------------------------- helpers


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_error_line(text: str) -> str:
    """The most useful line of a tool's stderr (errors first, else the first line)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"error|fail|denied|not permitted|no such|unknown|couldn't|invalid", ln, re.I):
            return _one_line(ln)
    return _one_line(lines[0]) if lines else ""


def _error_text(text: str) -> str:
    """All meaningful stderr lines on one line (drops usage boilerplate)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not ln.strip().startswith("Try `")]
    return _one_line("; ".join(lines))


def _run(
    argv: list[str], *, timeout: float = CMD_TIMEOUT, input: str | None = None, cwd: str | None = None
) -> subprocess.CompletedProcess:
    """Run argv with a timeout; on timeout kill its whole process group and raise ProbeError."""
    env = dict(os.environ, LC_ALL="C", LANG="C")
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as e:
        raise ProbeError(f"cannot run {argv[0]}: {e.strerror or e}") from e
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            proc.communicate(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        raise ProbeError(f"`{' '.join(argv[:4])}` did not finish within {timeout:g}s (killed)")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _tool_version(argv: list[str]) -> tuple[int, str]:
    cp = _run(argv, timeout=CMD_TIMEOUT)
    text = (cp.stdout or "").strip() or (cp.stderr or "").strip()
    return cp.returncode, _one_line(text.splitlines()[0]) if text else ""


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


# --------------------------------------------------------------------------- privileges

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

_CAP_NAMES = {
    CAP_NET_ADMIN: "CAP_NET_ADMIN",
    CAP_NET_RAW: "CAP_NET_RAW",
    CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
    CAP_PERFMON: "CAP_PERFMON",
    CAP_BPF: "CAP_BPF",
}


def parse_cap_eff(status_text: str) -> int:
    """The CapEff bit mask from /proc/<pid>/status text; ValueError when absent."""
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)\s*$", status_text, re.M)
    if not m:
        raise ValueError("no CapEff line in /proc/self/status")
    return int(m.group(1), 16)


def has_cap(mask: int, cap: int) -> bool:
    return bool(mask >> cap & 1)


def cap_names(mask: int) -> list[str]:
    """The capabilities that matter to hostmesh present in mask, by name."""
    return [name for cap, name in sorted(_CAP_NAMES.items()) if has_cap(mask, cap)]


def _cap_eff() -> int:
    text = _read_text("/proc/self/status")
    if text is None:
        raise ProbeError("cannot read /proc/self/status")
    return parse_cap_eff(text)


def check_privileges() -> CheckResult:
    name = "privileges"
    mask = _cap_eff()
    uid = os.geteuid()
    present = cap_names(mask)
    detail = f"uid {uid}, CapEff {mask:016x}: {' '.join(present) or 'none of the relevant capabilities'}"
    if has_cap(mask, CAP_NET_ADMIN):
        return CheckResult(name, OK, detail, "", True)
    return CheckResult(
        name,
        MISSING,
        detail + " (no CAP_NET_ADMIN)",
        "run as root (sudo hostmesh check); in a container grant CAP_NET_ADMIN "
        "and CAP_SYS_ADMIN (network namespaces), plus CAP_BPF for eBPF capture",
        True,
    )


def check_bpf_privileges() -> CheckResult:
    name = "bpf-privileges"
    mask = _cap_eff()
    last_cap = (_read_text("/proc/sys/kernel/cap_last_cap") or "").strip()
    kernel_knows_cap_bpf = last_cap.isdigit() and int(last_cap) >= CAP_BPF
    have_sys_admin = has_cap(mask, CAP_SYS_ADMIN)
    have_bpf = has_cap(mask, CAP_BPF) and has_cap(mask, CAP_NET_ADMIN)
    if have_sys_admin or have_bpf:
        via = "CAP_SYS_ADMIN" if have_sys_admin else "CAP_BPF+CAP_NET_ADMIN"
        return CheckResult(name, OK, f"may load cgroup/socket eBPF programs ({via})", "", False)
    need = "CAP_BPF and CAP_NET_ADMIN" if kernel_knows_cap_bpf else "CAP_SYS_ADMIN (kernel predates CAP_BPF)"
    return CheckResult(
        name,
        MISSING,
        f"CapEff {mask:016x} lacks {need}",
        f"run as root or grant {need}; without it the agent uses the iptables capture backend",
        False,
    )


# --------------------------------------------------------------------------- network namespaces


def _netns_name(probe: str = "") -> str:
    return f"{NETNS_PREFIX}{os.getpid()}" + (f"-{probe}" if probe else "")


def _netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def _netns_add(name: str) -> None:
    if shutil.which("ip"):
        cp = _run(["ip", "netns", "add", name])
        if cp.returncode != 0:
            raise ProbeError(f"ip netns add {name}: {_first_error_line(cp.stderr) or 'exit %d' % cp.returncode}")
        return
    try:  # fallback when iproute2 is not installed
        from pyroute2 import netns

        netns.create(name)
    except Exception as e:  # noqa: BLE001
        raise ProbeError(f"pyroute2.netns.create({name!r}): {type(e).__name__}: {e}") from e


def _netns_del(name: str) -> str | None:
    """Delete the namespace; returns an error text when it is still there afterwards."""
    if not os.path.lexists(_netns_path(name)):
        return None
    err = ""
    if shutil.which("ip"):
        try:
            cp = _run(["ip", "netns", "del", name])
            err = _first_error_line(cp.stderr)
        except ProbeError as e:
            err = str(e)
    if os.path.lexists(_netns_path(name)):
        try:
            from pyroute2 import netns

            netns.remove(name)
        except Exception as e:  # noqa: BLE001 - report, never raise from cleanup
            err = err or f"{type(e).__name__}: {e}"
    if os.path.lexists(_netns_path(name)):
        return err or "still present"
    return None


@contextmanager
def _throwaway_netns(name: str) -> Iterator[str]:
    """Create network namespace `name` and always delete it afterwards."""
    try:
        _netns_add(name)
    except BaseException:
        _netns_del(name)  # a half-made namespace must not stay behind
        raise
    try:
        yield name
    finally:
        _netns_del(name)


def _in_netns(name: str, argv: list[str]) -> list[str]:
    if shutil.which("ip"):
        return ["ip", "netns", "exec", name, *argv]
    return ["nsenter", f"--net={_netns_path(name)}", *argv]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_check_namespaces() -> list[str]:
    """Delete hm-check-<pid>* namespaces whose creating process is gone (crashed runs)."""
    removed = []
    try:
        names = os.listdir(NETNS_DIR)
    except OSError:
        return removed
    for n in names:
        m = re.fullmatch(re.escape(NETNS_PREFIX) + r"(\d+)(?:-[a-z0-9]+)?", n)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            if _netns_del(n) is None:
                removed.append(n)
    return removed


def check_netns() -> CheckResult:
    name = "netns"
    ns = _netns_name()
    tool = "ip netns" if shutil.which("ip") else "pyroute2.netns + nsenter"
    version = ""
    if shutil.which("ip"):
        try:
            version = _tool_version(["ip", "-V"])[1]
        except ProbeError:
            pass
    hint = (
        "run as root (creating a network namespace needs CAP_SYS_ADMIN); "
        "the kernel needs CONFIG_NET_NS; install iproute2 for `ip netns`"
    )
    try:
        with _throwaway_netns(ns):
            if not os.path.exists(_netns_path(ns)):
                return CheckResult(name, MISSING, f"{tool} add {ns} left no {_netns_path(ns)}", hint, True)
            cp = _run(_in_netns(ns, ["true"]))
            if cp.returncode != 0:
                return CheckResult(
                    name, MISSING, f"created {ns} but cannot enter it: {_first_error_line(cp.stderr)}", hint, True
                )
    except ProbeError as e:
        return CheckResult(name, MISSING, str(e), hint, True)
    if os.path.lexists(_netns_path(ns)):
        return CheckResult(name, MISSING, f"created {ns} but could not delete it", f"ip netns del {ns}", True)
    return CheckResult(
        name, OK, f"created, entered and deleted {ns} with {tool}" + (f" ({version})" if version else ""), "", True
    )


# --------------------------------------------------------------------------- iptables


def parse_iptables_version(text: str) -> tuple[str | None, str | None]:
    """(version, backend) from `iptables -V`; backend is "nf_tables", "legacy" or None.

    iptables >= 1.8 prints "iptables v1.8.9 (nf_tables)" or "(legacy)"; older releases
    print only "iptables v1.6.1" and have no other backend than legacy.
    """
    m = re.search(r"iptables(?:-[a-z]+)? v(\d[\w.\-]*)(?:\s*\(([\w\-]+)\))?", text or "")
    if not m:
        return None, None
    version, backend = m.group(1), m.group(2)
    if backend is None:
        backend = "legacy"
    return version, backend


def _iptables_info() -> tuple[str, str, str]:
    """(path, version, backend) of `iptables`; ProbeError when it is missing or broken."""
    path = shutil.which("iptables")
    if not path:
        raise ProbeError("iptables not found in PATH")
    cp = _run([path, "-V"])
    version, backend = parse_iptables_version(cp.stdout + cp.stderr)
    if version is None:
        raise ProbeError(f"`iptables -V` said {_one_line(cp.stdout + cp.stderr)!r} (exit {cp.returncode})")
    return path, version, backend or "legacy"


def check_iptables() -> CheckResult:
    name = "iptables"
    try:
        path, version, backend = _iptables_info()
    except ProbeError as e:
        return CheckResult(name, MISSING, str(e), "apt-get install iptables (the nf_tables backend)", True)
    real = os.path.realpath(path)
    where = path + (f" -> {real}" if real != path else "")
    detail = f"iptables v{version} ({backend}) at {where}"
    if backend == "nf_tables":
        return CheckResult(name, OK, detail, "", True)
    return CheckResult(
        name,
        DEGRADED,
        detail,
        "the legacy xtables backend works but mixes badly with nft-based tools; when nothing else on the "
        "host depends on legacy rules: update-alternatives --set iptables /usr/sbin/iptables-nft "
        "(and ip6tables -> ip6tables-nft)",
        True,
    )


@dataclass(frozen=True)
class IptablesFeature:
    name: str  # result name
    label: str  # what the user calls it
    table: str
    chain: str
    rules: tuple[str, ...]  # rule specs appended to chain
    needle: str  # must appear in iptables-save output afterwards
    kernel: str  # module / config option that provides it
    required: bool
    use: str  # what hostmesh uses it for


IPTABLES_FEATURES: tuple[IptablesFeature, ...] = (
    IptablesFeature(
        "iptables-redirect", "REDIRECT", "nat", "OUTPUT",
        ("-p tcp -m tcp --dport 9 -j REDIRECT --to-ports 15001",),
        "REDIRECT", "xt_REDIRECT + nf_nat (CONFIG_NETFILTER_XT_TARGET_REDIRECT)", True,
        "outbound capture to :15001",
    ),
    IptablesFeature(
        "iptables-mark", "mark", "mangle", "OUTPUT",
        ("-m mark --mark 0x1/0x1 -j RETURN", "-p tcp -j MARK --set-xmark 0x2/0x2"),
        "mark", "xt_mark (CONFIG_NETFILTER_XT_MARK)", True,
        "marking proxy traffic so it is not captured again",
    ),
    IptablesFeature(
        "iptables-owner", "owner", "nat", "OUTPUT",
        ("-m owner --uid-owner 0 -j RETURN",),
        "--uid-owner", "xt_owner (CONFIG_NETFILTER_XT_MATCH_OWNER)", False,
        "exempting host processes by owner (capture of host processes)",
    ),
    IptablesFeature(
        "iptables-tproxy", "TPROXY", "mangle", "PREROUTING",
        ("-p tcp -m tcp --dport 9 -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1",),
        "TPROXY", "xt_TPROXY + nf_tproxy_ipv4 (CONFIG_NETFILTER_XT_TARGET_TPROXY)", False,
        "transparent inbound keeping the client's source address (capture uses REDIRECT today)",
    ),
    IptablesFeature(
        "iptables-socket", "socket", "mangle", "PREROUTING",
        ("-p tcp -m socket --transparent -j RETURN",),
        "-m socket", "xt_socket (CONFIG_NETFILTER_XT_MATCH_SOCKET)", False,
        "short-cutting packets of already-accepted TPROXY connections",
    ),
)


def iptables_ruleset(feature: IptablesFeature) -> str:
    """The iptables-restore input that exercises one feature."""
    lines = [f"*{feature.table}", f":{feature.chain} ACCEPT [0:0]"]
    lines += [f"-A {feature.chain} {spec}" for spec in feature.rules]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _probe_iptables_feature(ns: str, feature: IptablesFeature, backend: str) -> CheckResult:
    restore = shutil.which("iptables-restore")
    save = shutil.which("iptables-save")
    cp = _run(_in_netns(ns, [restore, "-w", "5"]), input=iptables_ruleset(feature))
    if cp.returncode != 0:
        why = _error_text(cp.stderr) or f"iptables-restore exit {cp.returncode}"
        return CheckResult(
            feature.name,
            MISSING if feature.required else DEGRADED,
            f"{feature.label} rejected ({feature.table} {feature.chain}, {backend}): {why}",
            f"kernel lacks {feature.kernel}: try `modprobe {feature.kernel.split()[0]}` or use a kernel with it; "
            f"hostmesh needs it for {feature.use}",
            feature.required,
        )
    installed = ""
    if save:
        installed = _run(_in_netns(ns, [save, "-t", feature.table])).stdout
    if save and feature.needle not in installed:
        return CheckResult(
            feature.name,
            MISSING if feature.required else DEGRADED,
            f"iptables-restore accepted {feature.label} but iptables-save in {ns} does not show it",
            f"check {feature.kernel}",
            feature.required,
        )
    return CheckResult(
        feature.name,
        OK,
        f"{feature.label} installed and removed in {ns} ({feature.table} {feature.chain}, {backend})",
        "",
        feature.required,
    )


def check_iptables_features() -> list[CheckResult]:
    """Install one ruleset per target/match in a throwaway netns; report each by name."""
    try:
        _, _, backend = _iptables_info()
        if not shutil.which("iptables-restore"):
            raise ProbeError("iptables-restore not found in PATH")
    except ProbeError as e:
        return [
            CheckResult(f.name, MISSING, f"not tested: {e}", "apt-get install iptables", f.required)
            for f in IPTABLES_FEATURES
        ]
    ns = _netns_name("ipt")
    try:
        with _throwaway_netns(ns):
            return [
                _guard_one(f.name, f.required, _probe_iptables_feature, ns, f, backend) for f in IPTABLES_FEATURES
            ]
    except ProbeError as e:
        return [
            CheckResult(f.name, MISSING, f"not tested: {e}", "see the netns item", f.required)
            for f in IPTABLES_FEATURES
        ]


# --------------------------------------------------------------------------- policy routing

# Runs in a child interpreter (so a stuck netlink call can be killed); argv[1] = netns name.
_POLICY_ROUTING_PROBE = r"""
import json, socket, sys
name = sys.argv[1]
TABLE, PRIO, MARK, PROBE_DST = 100, 100, 0x1, "198.18.255.1"
out = {}
try:
    import pyroute2
    out["pyroute2"] = getattr(pyroute2, "__version__", "?")
    try:
        from pyroute2 import IPRoute
        ipr = IPRoute(netns=name)
    except TypeError:  # pyroute2 < 0.9.1
        from pyroute2 import NetNS
        ipr = NetNS(name)
    with ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        ipr.rule("add", table=TABLE, priority=PRIO, fwmark=MARK, fwmask=MARK)
        try:
            ipr.route("add", dst="0.0.0.0", dst_len=0, type="local", scope="host", oif=lo, table=TABLE)
            try:
                rules = [r for r in ipr.get_rules(family=socket.AF_INET) if r.get("FRA_TABLE") == TABLE]
                if not rules or rules[0].get("FRA_FWMARK") != MARK:
                    raise RuntimeError("fwmark rule not listed after adding it")
                got = ipr.route("get", dst=PROBE_DST, mark=MARK)
                if not got or got[0]["type"] != 2:  # RTN_LOCAL
                    raise RuntimeError("a marked packet to %s was not routed locally" % PROBE_DST)
            finally:
                ipr.route("del", dst="0.0.0.0", dst_len=0, type="local", scope="host", oif=lo, table=TABLE)
        finally:
            ipr.rule("del", table=TABLE, priority=PRIO, fwmark=MARK, fwmask=MARK)
        left = [r for r in ipr.get_rules(family=socket.AF_INET) if r.get("FRA_TABLE") == TABLE]
        if left:
            raise RuntimeError("fwmark rule still listed after deleting it")
    out["ok"] = True
except Exception as e:
    out["error"] = "%s: %s" % (type(e).__name__, e)
print(json.dumps(out))
"""


def _run_python(script: str, args: list[str], timeout: float) -> dict:
    """Run script in a fresh interpreter (same venv), return the JSON object it prints last."""
    cp = _run([sys.executable, "-I", "-c", script, *args], timeout=timeout, cwd="/")
    for line in reversed((cp.stdout or "").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            data.setdefault("stderr", cp.stderr or "")
            return data
    raise ProbeError(
        f"probe interpreter exited {cp.returncode}: {_first_error_line(cp.stderr) or 'no output'}"
    )


def check_policy_routing() -> CheckResult:
    name = "policy-routing"
    ns = _netns_name("rt")
    hint = "the kernel needs CONFIG_IP_MULTIPLE_TABLES and pyroute2 must be installed; TPROXY capture depends on it"
    try:
        with _throwaway_netns(ns):
            res = _run_python(_POLICY_ROUTING_PROBE, [ns], PYROUTE2_TIMEOUT)
    except ProbeError as e:
        return CheckResult(name, MISSING, f"not tested: {e}", hint + "; see the netns item", True)
    if res.get("ok"):
        return CheckResult(
            name,
            OK,
            f"fwmark 0x1 rule + local route in table 100 added, verified and removed in {ns} "
            f"(pyroute2 {res.get('pyroute2')})",
            "",
            True,
        )
    return CheckResult(name, MISSING, f"in {ns}: {res.get('error', 'unknown failure')}", hint, True)


# --------------------------------------------------------------------------- cgroup v2


def check_cgroup2(mountinfo: str = cgroups.MOUNTINFO) -> CheckResult:
    name = "cgroup2"
    path = cgroups.find_cgroup2_mount(mountinfo)
    layout = cgroups.cgroup_layout(mountinfo)
    if path is None:
        return CheckResult(
            name,
            MISSING,
            f"no cgroup2 filesystem in {mountinfo} (layout: {layout})",
            "mount it: mount -t cgroup2 none /sys/fs/cgroup/unified (hybrid) or boot with "
            "systemd.unified_cgroup_hierarchy=1; workloads are identified by cgroup v2 path",
            True,
        )
    note = {
        "unified": "unified layout, v2 only",
        "hybrid": "hybrid layout: v1 controllers elsewhere, v2 hierarchy usable for eBPF attach",
    }.get(layout, f"{layout} layout")
    controllers = _read_text(os.path.join(path, "cgroup.controllers"))
    if controllers is None:
        return CheckResult(
            name, DEGRADED, f"cgroup2 listed at {path} but {path}/cgroup.controllers is unreadable ({note})",
            "check the mount (a stale or masked /sys/fs/cgroup?)", True,
        )
    return CheckResult(name, OK, f"cgroup2 at {path} ({note})", "", True)


# --------------------------------------------------------------------------- raw bpf()

_BPF_SYSCALL_NR = {
    "x86_64": 321, "amd64": 321, "i386": 357, "i686": 357,
    "aarch64": 280, "arm64": 280, "riscv64": 280, "loongarch64": 280,
    "armv7l": 386, "armv6l": 386, "ppc64le": 361, "ppc64": 361, "s390x": 351,
}
BPF_MAP_CREATE = 0
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_SOCKHASH = 18
BPF_PROG_TYPE_SK_MSG = 16
BPF_SK_MSG_VERDICT = 7
_ATTR_SIZE = 128  # larger than any field we set; the tail stays zero as the kernel requires


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    nr = _BPF_SYSCALL_NR.get(platform.machine())
    if nr is None:
        raise ProbeError(f"bpf() syscall number unknown for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(len(attr)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


def bpf_map_create_array() -> None:
    """BPF_MAP_CREATE of a 1-entry u32 array, closed again; OSError when refused."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIIII", attr, 0, BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0)
    os.close(_bpf(BPF_MAP_CREATE, attr))


# r0 = 1; exit
_RETURN_ONE = bytes.fromhex("b700000001000000" "9500000000000000")


def bpf_prog_load(prog_type: int, expected_attach_type: int, log: bool = False) -> str:
    """Load the 2-instruction program `r0 = 1; exit` of prog_type, close it.

    Returns "" on success; raises OSError (with the verifier log when log=True).
    """
    os.close(_bpf_prog_load_fd(prog_type, expected_attach_type, log))
    return ""


def _bpf_prog_load_fd(prog_type: int, expected_attach_type: int, log: bool = False) -> int:
    insns = ctypes.create_string_buffer(_RETURN_ONE, len(_RETURN_ONE))
    license_ = ctypes.create_string_buffer(b"GPL")
    logbuf = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version, prog_flags
    struct.pack_into(
        "=IIQQIIQII", attr, 0,
        prog_type, len(_RETURN_ONE) // 8, ctypes.addressof(insns), ctypes.addressof(license_),
        1 if log else 0, len(logbuf) if log else 0, ctypes.addressof(logbuf) if log else 0, 0, 0,
    )
    struct.pack_into("=16s", attr, 48, b"hm_check")  # prog_name
    struct.pack_into("=II", attr, 64, 0, expected_attach_type)  # prog_ifindex, expected_attach_type
    try:
        fd = _bpf(BPF_PROG_LOAD, attr)
    except OSError as e:
        verifier = _one_line(logbuf.value.decode(errors="replace")) if log else ""
        raise OSError(e.errno, e.strerror + (f"; verifier: {verifier}" if verifier else "")) from None
    return fd


def bpf_sockhash_sk_msg() -> None:
    """What same-node acceleration needs end to end: create a sockhash (the hm_socks shape:
    12-byte key, u64 value), load an sk_msg program and attach it to the map as its
    BPF_SK_MSG_VERDICT program, then detach and close everything. OSError names the step."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("=IIIII", attr, 0, BPF_MAP_TYPE_SOCKHASH, 12, 8, 1, 0)
    try:
        map_fd = _bpf(BPF_MAP_CREATE, attr)
    except OSError as e:
        raise OSError(e.errno, f"creating a BPF_MAP_TYPE_SOCKHASH: {e.strerror}") from None
    try:
        prog_fd = _bpf_prog_load_fd(BPF_PROG_TYPE_SK_MSG, 0)
        try:
            att = ctypes.create_string_buffer(_ATTR_SIZE)
            struct.pack_into("=IIII", att, 0, map_fd, prog_fd, BPF_SK_MSG_VERDICT, 0)
            try:
                _bpf(BPF_PROG_ATTACH, att)
            except OSError as e:
                raise OSError(e.errno, f"attaching sk_msg to the sockhash (BPF_SK_MSG_VERDICT): {e.strerror}") from None
            _bpf(BPF_PROG_DETACH, att)
        finally:
            os.close(prog_fd)
    finally:
        os.close(map_fd)


def check_bpf_sockhash() -> CheckResult:
    name = "bpf-sockhash-sk-msg"
    try:
        bpf_sockhash_sk_msg()
    except (OSError, ProbeError) as e:
        if isinstance(e, OSError) and e.errno == errno.EPERM:
            hint = "needs root (CAP_BPF+CAP_NET_ADMIN)"
        else:
            hint = ("needs kernel >= 4.18 (sockhash) with CONFIG_BPF_STREAM_PARSER; without it capture.accelerate "
                    "cannot be switched on (eBPF capture itself still works)")
        return CheckResult(name, MISSING, f"same-node acceleration unavailable: {e}", hint, False)
    return CheckResult(name, OK, "sockhash created and an sk_msg program attached to it (capture.accelerate "
                                 "can be switched on)", "", False)


def check_bpf_syscall() -> CheckResult:
    name = "bpf-syscall"
    nr = _BPF_SYSCALL_NR.get(platform.machine())
    unpriv = (_read_text("/proc/sys/kernel/unprivileged_bpf_disabled") or "?").strip()
    try:
        bpf_map_create_array()
    except (OSError, ProbeError) as e:
        if isinstance(e, OSError) and e.errno == errno.ENOSYS:
            why, hint = "bpf() not implemented", "kernel built without CONFIG_BPF_SYSCALL; use the iptables backend"
        elif isinstance(e, OSError) and e.errno == errno.EPERM:
            why = "bpf() refused (EPERM)"
            hint = "run as root / grant CAP_BPF; a container's seccomp profile or kernel lockdown may also block bpf()"
        else:
            why, hint = f"bpf() failed: {e}", "the agent falls back to the iptables capture backend"
        return CheckResult(name, MISSING, f"{why} (syscall {nr} on {platform.machine()})", hint, False)
    return CheckResult(
        name, OK,
        f"BPF_MAP_CREATE of a 1-entry array worked (syscall {nr} on {platform.machine()}; "
        f"kernel.unprivileged_bpf_disabled={unpriv})",
        "", False,
    )


def check_btf(path: str = "/sys/kernel/btf/vmlinux") -> CheckResult:
    name = "kernel-btf"
    try:
        size = os.path.getsize(path)
    except OSError:
        return CheckResult(
            name, MISSING, f"{path} not present",
            "kernel built without CONFIG_DEBUG_INFO_BTF: CO-RE (libbpf) programs cannot load; bcc still works "
            "with kernel headers",
            False,
        )
    return CheckResult(name, OK, f"{path} present ({size // 1024} KiB)", "", False)


@dataclass(frozen=True)
class BpfProgType:
    name: str
    label: str
    prog_type: int
    prog_type_name: str
    attach_type: int
    attach_type_name: str
    since: str  # first kernel with it
    use: str


# expected_attach_type is mandatory for CGROUP_SOCK_ADDR, CGROUP_SOCKOPT and SK_LOOKUP; for SOCK_OPS
# and SK_MSG the kernel ignores it at load time, so 0 keeps old kernels happy.
BPF_PROG_TYPES: tuple[BpfProgType, ...] = (
    BpfProgType("bpf-cgroup-connect4", "cgroup/connect4", 18, "BPF_PROG_TYPE_CGROUP_SOCK_ADDR",
                10, "BPF_CGROUP_INET4_CONNECT", "4.17", "rewriting outbound connect() to the proxy"),
    BpfProgType("bpf-sockops", "sockops", 13, "BPF_PROG_TYPE_SOCK_OPS", 0, "",
                "4.13", "recording original destinations of established sockets"),
    BpfProgType("bpf-sk-msg", "sk_msg", 16, "BPF_PROG_TYPE_SK_MSG", 0, "",
                "4.17", "same-node acceleration (capture.accelerate: socket-to-socket redirection)"),
    BpfProgType("bpf-cgroup-getsockopt", "cgroup/getsockopt", 25, "BPF_PROG_TYPE_CGROUP_SOCKOPT",
                21, "BPF_CGROUP_GETSOCKOPT", "5.3", "answering SO_ORIGINAL_DST for the proxy"),
    BpfProgType("bpf-sk-lookup", "sk_lookup", 30, "BPF_PROG_TYPE_SK_LOOKUP", 36, "BPF_SK_LOOKUP", "5.9",
                "handing inbound connections for local pods to the proxy's listener"),
)


def _check_bpf_prog_type(p: BpfProgType) -> CheckResult:
    what = p.prog_type_name + (f" (expected_attach_type {p.attach_type_name})" if p.attach_type_name else "")
    try:
        try:
            bpf_prog_load(p.prog_type, p.attach_type)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EACCES):
                bpf_prog_load(p.prog_type, p.attach_type, log=True)  # again, for the verifier's words
            else:
                raise
    except (OSError, ProbeError) as e:
        if isinstance(e, OSError) and e.errno == errno.EPERM:
            hint = "needs root (CAP_BPF+CAP_NET_ADMIN, or CAP_SYS_ADMIN)"
        else:
            hint = f"needs kernel >= {p.since} with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF; used for {p.use}"
        return CheckResult(p.name, MISSING, f"loading {p.label} failed: {what}: {e}", hint, False)
    return CheckResult(p.name, OK, f"{p.label} loaded and closed: {what}", "", False)


def check_bpf_prog_types() -> list[CheckResult]:
    return [_guard_one(p.name, False, _check_bpf_prog_type, p) for p in BPF_PROG_TYPES]


# --------------------------------------------------------------------------- bcc + kernel headers

_BCC_PROBE = r"""
import json, sys, time
out = {}
try:
    import bcc
except Exception as e:
    out["import_error"] = "%s: %s" % (type(e).__name__, e)
    print(json.dumps(out)); sys.exit(0)
out["file"] = bcc.__file__
out["version"] = getattr(bcc, "__version__", None)
src = "#include <uapi/linux/bpf.h>\nint hm_check_connect4(struct bpf_sock_addr *ctx) { return 1; }\n"
t0 = time.monotonic()
b = None
try:
    b = bcc.BPF(text=src)
    out["compiled"] = True
    # load only (expected_attach_type BPF_CGROUP_INET4_CONNECT); nothing is attached
    b.load_func("hm_check_connect4", bcc.BPF.CGROUP_SOCK_ADDR, attach_type=10)
    out["loaded"] = True
except Exception as e:
    out["error"] = "%s: %s" % (type(e).__name__, e)
finally:
    if b is not None:
        try:
            b.cleanup()
        except Exception:
            pass
out["seconds"] = round(time.monotonic() - t0, 2)
print(json.dumps(out))
"""


def probe_bcc() -> dict:
    """Import bcc and compile + load (never attach) a trivial cgroup/connect4 program, in a child."""
    try:
        return _run_python(_BCC_PROBE, [], BCC_TIMEOUT)
    except ProbeError as e:
        return {"probe_error": str(e)}


def check_bcc(probe: dict) -> CheckResult:
    name = "bcc"
    hint = (
        "apt-get install python3-bpfcc (bcc is not on PyPI) and make the venv with "
        "--system-site-packages (./quickstart does); optional, the iptables backend needs no bcc"
    )
    if "probe_error" in probe:
        return CheckResult(name, MISSING, f"not tested: {probe['probe_error']}", hint, False)
    if "import_error" in probe:
        return CheckResult(name, MISSING, f"import bcc failed in {sys.executable}: {probe['import_error']}", hint, False)
    return CheckResult(name, OK, f"bcc {probe.get('version') or '?'} from {probe.get('file')}", "", False)


def check_bcc_compile(probe: dict) -> CheckResult:
    name = "bcc-compile"
    if "probe_error" in probe or "import_error" in probe:
        return CheckResult(name, MISSING, "not tested: bcc is not importable", "see the bcc item", False)
    took = f"{probe.get('seconds', '?')}s"
    if probe.get("loaded"):
        return CheckResult(name, OK, f"compiled and loaded a cgroup/connect4 test program in {took} (not attached)",
                           "", False)
    err = _one_line(probe.get("error", ""))
    clang = _first_error_line(probe.get("stderr", ""))
    if probe.get("compiled"):
        return CheckResult(name, DEGRADED, f"compiled, but the kernel refused to load it: {err}",
                           "run as root (CAP_BPF+CAP_NET_ADMIN); see the bpf-* items", False)
    return CheckResult(
        name, MISSING, f"compile failed: {err}" + (f" ({clang})" if clang and clang not in err else ""),
        "bcc needs kernel headers: see the kernel-headers item", False,
    )


_DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64el", "s390x": "s390x",
             "riscv64": "riscv64", "i686": "686", "i386": "686", "armv7l": "armmp"}


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _headers_release(build_dir: str) -> tuple[str, str | None]:
    """(name-derived release, include/config/kernel.release) of a headers directory."""
    base = os.path.basename(os.path.realpath(build_dir).rstrip("/"))
    derived = base[len("linux-headers-"):] if base.startswith("linux-headers-") else base
    rel = _read_text(os.path.join(build_dir, "include", "config", "kernel.release"))
    return derived, (rel.strip() or None) if rel else None


def _link_hint(release: str, modules_root: str, build: str) -> str:
    mod = os.path.join(modules_root, release)
    common = re.sub(r"-[^-]+$", "-common", build)
    return (
        f"create the two links: ln -sfn {build} {mod}/build; ln -sfn {common} {mod}/source "
        "(./quickstart does this in link_kernel_headers)"
    )


def diagnose_kernel_headers(
    release: str | None = None,
    machine: str | None = None,
    modules_root: str = "/lib/modules",
    src_root: str = "/usr/src",
    compile_ok: bool | None = None,
    kheaders: str = "/sys/kernel/kheaders.tar.xz",
) -> CheckResult:
    """Where bcc will find kernel headers for the running kernel, and what to do if nowhere.

    compile_ok is the outcome of the bcc compile probe (None when bcc is missing): mismatched
    headers that compile fine are reported "ok" with the mismatch in the detail.
    """
    name = "kernel-headers"
    release = release or platform.release()
    machine = machine or platform.machine()
    arch = _DEB_ARCH.get(machine, machine)
    mod = os.path.join(modules_root, release)
    build = os.path.join(mod, "build")
    source = os.path.join(mod, "source")

    if os.path.isdir(build):
        target = os.path.realpath(build)
        derived, kernel_release = _headers_release(build)
        where = f"{build} -> {target}" if target != build else build
        src_note = ""
        if os.path.isdir(source):
            src_note = f", source -> {os.path.realpath(source)}"
        elif not os.path.isdir(os.path.join(build, "include", "linux")):
            common = re.sub(r"-[^-]+$", "-common", target)
            return CheckResult(
                name, DEGRADED, f"{where}, but {source} is missing and {target} has no include/linux",
                f"ln -sfn {common} {source} (Debian splits headers into -{arch} and -common; "
                "./quickstart links both)",
                False,
            )
        headers = derived + (f" (kernel.release {kernel_release})" if kernel_release and kernel_release != derived
                             else "")
        if release in (derived, kernel_release):
            return CheckResult(name, OK, f"{where}{src_note}: headers {headers} match the running kernel", "", False)
        mismatch = f"{where}{src_note}: headers {headers} for running kernel {release} (version mismatch"
        if compile_ok:
            return CheckResult(
                name, OK, mismatch + "; bcc compiled a test program with them)", "", False
            )
        return CheckResult(
            name, DEGRADED, mismatch + (")" if compile_ok is None else "; the bcc test compile failed)"),
            f"install headers matching {release} (apt-get install linux-headers-{release}) if your distribution "
            "has them; mismatched headers can miscompile programs that read kernel structs",
            False,
        )

    if os.path.islink(build):
        return CheckResult(
            name, MISSING, f"{build} -> {os.readlink(build)} which does not exist",
            f"remove the dangling link (rm {build}) and link existing headers, or install linux-headers-{release}",
            False,
        )

    candidates = sorted(
        (d for d in glob.glob(os.path.join(src_root, f"linux-headers-*-{arch}")) if os.path.isdir(d)),
        key=_natural_key,
    )
    found = ", ".join(candidates) if candidates else f"no {src_root}/linux-headers-*-{arch}"
    if os.path.exists(kheaders):
        return CheckResult(
            name, DEGRADED, f"{build} missing; bcc will fall back to {kheaders} (CONFIG_IKHEADERS); found {found}",
            _link_hint(release, modules_root, candidates[-1]) if candidates
            else f"apt-get install linux-headers-{release} for on-disk headers",
            False,
        )
    if candidates:
        return CheckResult(
            name, MISSING, f"{build} missing; candidate headers: {found}",
            _link_hint(release, modules_root, candidates[-1])
            + f"; the newest is taken, matching {release} exactly is better if available",
            False,
        )
    return CheckResult(
        name, MISSING, f"{build} missing and {found}",
        f"apt-get install linux-headers-{release} (or linux-headers-{arch} for the nearest version, "
        f"then link it as {mod}/build and its -common twin as {mod}/source; ./quickstart does that)",
        False,
    )


# --------------------------------------------------------------------------- tools

# (tool, version argv, Debian package)
TOOLS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("curl", ("--version",), "curl"),
    ("nghttp", ("--version",), "nghttp2-client"),
    ("h2load", ("--version",), "nghttp2-client"),
    ("openssl", ("version",), "openssl"),
    ("tcpdump", ("--version",), "tcpdump"),
    ("bpftool", ("version",), "bpftool"),
)


def _check_tool(tool: str, version_args: tuple[str, ...], package: str) -> CheckResult:
    path = shutil.which(tool)
    if not path:
        return CheckResult(tool, MISSING, f"{tool} not found in PATH",
                           f"apt-get install {package} (used by tests and `hostmesh demo`, not by the agent)", False)
    rc, version = _tool_version([path, *version_args])
    if rc != 0:
        return CheckResult(tool, DEGRADED, f"{path} exits {rc} on `{' '.join(version_args)}`: {version}",
                           f"reinstall {package}", False)
    # "curl 7.88.1 (x86_64-pc-linux-gnu) libcurl/7.88.1 OpenSSL/..." -> "curl 7.88.1"
    return CheckResult(tool, OK, f"{path}: {_one_line(version.split(' (')[0], 80)}", "", False)


def check_tools() -> list[CheckResult]:
    return [_guard_one(t, False, _check_tool, t, args, pkg) for t, args, pkg in TOOLS]


# --------------------------------------------------------------------------- running and rendering


def _guard_one(name: str, required: bool, fn: Callable, *args) -> CheckResult:
    return _guard([(name, required)], fn, *args)[0]


def _guard(items: list[tuple[str, bool]], fn: Callable, *args) -> list[CheckResult]:
    """Run one check; an exception becomes a "missing" result for each item it covers."""
    try:
        res = fn(*args)
        return list(res) if isinstance(res, (list, tuple)) else [res]
    except ProbeError as e:  # a command timed out or could not be started
        return [
            CheckResult(name, MISSING, f"probe failed: {_one_line(str(e))}",
                        "rerun `hostmesh check`; if it persists, run the command named here by hand", required)
            for name, required in items
        ]
    except Exception as e:  # noqa: BLE001 - a probe must never break the whole report
        return [
            CheckResult(name, MISSING, f"probe failed: {type(e).__name__}: {_one_line(str(e))}",
                        "unexpected error in the check itself; please report it with this line", required)
            for name, required in items
        ]


def run_checks() -> list[CheckResult]:
    """Run every check (a few seconds); never raises."""
    try:
        remove_stale_check_namespaces()
    except Exception:  # noqa: BLE001
        pass
    results: list[CheckResult] = []
    results += _guard([("privileges", True)], check_privileges)
    results += _guard([("netns", True)], check_netns)
    results += _guard([("iptables", True)], check_iptables)
    results += _guard([(f.name, f.required) for f in IPTABLES_FEATURES], check_iptables_features)
    # REDIRECT capture needs no policy routing; TPROXY (source-address preservation) will
    results += _guard([("policy-routing", False)], check_policy_routing)
    results += _guard([("cgroup2", True)], check_cgroup2)
    results += _guard([("bpf-privileges", False)], check_bpf_privileges)
    results += _guard([("bpf-syscall", False)], check_bpf_syscall)
    results += _guard([("kernel-btf", False)], check_btf)
    results += _guard([(p.name, False) for p in BPF_PROG_TYPES], check_bpf_prog_types)
    results += _guard([("bpf-sockhash-sk-msg", False)], check_bpf_sockhash)
    try:
        bcc_probe = probe_bcc()
    except Exception as e:  # noqa: BLE001
        bcc_probe = {"probe_error": f"{type(e).__name__}: {e}"}
    results += _guard([("bcc", False)], check_bcc, bcc_probe)
    # True/False once bcc tried to compile; None when bcc could not even be imported
    compile_ok = True if bcc_probe.get("compiled") else (False if "error" in bcc_probe else None)
    results += _guard([("kernel-headers", False)], lambda: diagnose_kernel_headers(compile_ok=compile_ok))
    results += _guard([("bcc-compile", False)], check_bcc_compile, bcc_probe)
    results += _guard([(t, False) for t, _, _ in TOOLS], check_tools)
    return results


def exit_code(results: Iterable[CheckResult]) -> int:
    """1 if any required item is missing, else 0."""
    return 1 if any(r.required and r.status == MISSING for r in results) else 0


def format_table(results: Iterable[CheckResult]) -> str:
    """One line per item: status, name, detail, and for not-ok items the hint."""
    results = list(results)
    width = max([len(r.name) for r in results] + [4])
    lines = []
    for r in results:
        line = f"{r.status:<8}  {r.name:<{width}}  {_one_line(r.detail, 400)}"
        if r.status != OK:
            tag = "required" if r.required else "optional"
            line += f"  -> [{tag}] {_one_line(r.hint, 400)}" if r.hint else f"  [{tag}]"
        lines.append(line)
    return "\n".join(lines)


def to_json(results: Iterable[CheckResult]) -> str:
    results = list(results)
    return json.dumps({"ok": exit_code(results) == 0, "checks": [asdict(r) for r in results]}, indent=2)


__all__ = [
    "CheckResult", "run_checks", "format_table", "to_json", "exit_code",
    "parse_cap_eff", "parse_iptables_version", "diagnose_kernel_headers", "iptables_ruleset",
]
