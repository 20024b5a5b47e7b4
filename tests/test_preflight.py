"""Tests of the host preflight (`hostmesh check`, nodeagent/preflight.py) and cgroup discovery.

Most tests need no privileges. test_run_checks_as_root_is_truthful runs the real probes and
cross-checks them against independent sources; it skips when not root, and fails instead
when CI=true.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from nodeagent import cgroups, preflight
from nodeagent.preflight import (
    DEGRADED,
    MISSING,
    OK,
    CheckResult,
    diagnose_kernel_headers,
    exit_code,
    format_table,
    parse_cap_eff,
    parse_iptables_version,
    to_json,
)

# --------------------------------------------------------------------------- capabilities

STATUS_ROOT = """Name:\tpython3
Umask:\t0022
State:\tR (running)
CapInh:\t0000000000000000
CapPrm:\t000001fffeffffff
CapEff:\t000001fffeffffff
CapBnd:\t000001fffeffffff
CapAmb:\t0000000000000000
"""
# CAP_NET_ADMIN (12) and CAP_NET_RAW (13) only
STATUS_NET_ADMIN = STATUS_ROOT.replace("CapEff:\t000001fffeffffff", "CapEff:\t0000000000003000")
STATUS_NOBODY = STATUS_ROOT.replace("CapEff:\t000001fffeffffff", "CapEff:\t0000000000000000")


def test_parse_cap_eff():
    assert parse_cap_eff(STATUS_ROOT) == 0x1FFFEFFFFFF
    assert parse_cap_eff(STATUS_NOBODY) == 0
    mask = parse_cap_eff(STATUS_NET_ADMIN)
    assert preflight.has_cap(mask, preflight.CAP_NET_ADMIN)
    assert not preflight.has_cap(mask, preflight.CAP_SYS_ADMIN)
    assert preflight.cap_names(mask) == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    assert preflight.cap_names(parse_cap_eff(STATUS_ROOT)) == [
        "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN", "CAP_PERFMON", "CAP_BPF",
    ]


def test_parse_cap_eff_without_line():
    with pytest.raises(ValueError):
        parse_cap_eff("Name:\tx\nCapPrm:\t0\n")


def _fake_proc(monkeypatch, status: str, cap_last_cap: str = "40"):
    files = {"/proc/self/status": status, "/proc/sys/kernel/cap_last_cap": cap_last_cap + "\n"}
    monkeypatch.setattr(preflight, "_read_text", lambda path: files.get(path))


def test_privileges_from_capeff(monkeypatch):
    _fake_proc(monkeypatch, STATUS_NET_ADMIN)
    r = preflight.check_privileges()
    assert (r.name, r.status, r.required, r.hint) == ("privileges", OK, True, "")
    assert "CAP_NET_ADMIN" in r.detail and "0000000000003000" in r.detail

    _fake_proc(monkeypatch, STATUS_NOBODY)
    r = preflight.check_privileges()
    assert r.status == MISSING and r.required and "root" in r.hint
    assert "no CAP_NET_ADMIN" in r.detail


def test_bpf_privileges(monkeypatch):
    _fake_proc(monkeypatch, STATUS_ROOT)
    r = preflight.check_bpf_privileges()
    assert r.status == OK and not r.required

    _fake_proc(monkeypatch, STATUS_NET_ADMIN)  # NET_ADMIN without BPF or SYS_ADMIN
    r = preflight.check_bpf_privileges()
    assert r.status == MISSING and not r.required and "CAP_BPF" in r.detail

    _fake_proc(monkeypatch, STATUS_NET_ADMIN, cap_last_cap="37")  # kernel older than CAP_BPF
    assert "CAP_SYS_ADMIN" in preflight.check_bpf_privileges().detail

    bpf_and_net_admin = (1 << preflight.CAP_BPF) | (1 << preflight.CAP_NET_ADMIN)
    _fake_proc(monkeypatch, STATUS_ROOT.replace("000001fffeffffff", f"{bpf_and_net_admin:016x}"))
    r = preflight.check_bpf_privileges()
    assert r.status == OK and "CAP_BPF+CAP_NET_ADMIN" in r.detail


# --------------------------------------------------------------------------- iptables


@pytest.mark.parametrize(
    "text,expected",
    [
        ("iptables v1.8.9 (nf_tables)\n", ("1.8.9", "nf_tables")),
        ("iptables v1.8.7 (legacy)\n", ("1.8.7", "legacy")),
        ("iptables v1.6.1\n", ("1.6.1", "legacy")),  # before 1.8 there was only legacy
        ("iptables-legacy v1.8.4 (legacy)", ("1.8.4", "legacy")),
        ("bash: iptables: command not found", (None, None)),
        ("", (None, None)),
    ],
)
def test_parse_iptables_version(text, expected):
    assert parse_iptables_version(text) == expected


def _fake_bin(tmp_path, name: str, script: str) -> None:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + script + "\n")
    p.chmod(0o755)


def test_check_iptables_backends(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    r = preflight.check_iptables()
    assert r.status == MISSING and r.required and "not found" in r.detail

    _fake_bin(tmp_path, "iptables", 'echo "iptables v1.8.7 (legacy)"')
    r = preflight.check_iptables()
    assert r.status == DEGRADED and r.required
    assert "v1.8.7 (legacy)" in r.detail and "iptables-nft" in r.hint

    _fake_bin(tmp_path, "iptables", 'echo "iptables v1.8.9 (nf_tables)"')
    r = preflight.check_iptables()
    assert r.status == OK and r.hint == "" and str(tmp_path / "iptables") in r.detail


def test_iptables_features_without_iptables_are_reported_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    results = preflight.check_iptables_features()
    assert [r.name for r in results] == [
        "iptables-redirect", "iptables-mark", "iptables-owner", "iptables-tproxy", "iptables-socket",
    ]
    assert all(r.status == MISSING and "not tested" in r.detail for r in results)
    required = {r.name for r in results if r.required}
    assert required == {"iptables-redirect", "iptables-mark"}


def test_iptables_rulesets_use_each_extension():
    by_name = {f.name: preflight.iptables_ruleset(f) for f in preflight.IPTABLES_FEATURES}
    assert "*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -p tcp" in by_name["iptables-tproxy"]
    assert "-j TPROXY --on-port 15006" in by_name["iptables-tproxy"]
    assert "-j REDIRECT --to-ports 15001" in by_name["iptables-redirect"]
    assert "-m owner --uid-owner" in by_name["iptables-owner"]
    assert "-m socket" in by_name["iptables-socket"]
    assert "-m mark --mark" in by_name["iptables-mark"] and "-j MARK" in by_name["iptables-mark"]
    assert all(text.endswith("COMMIT\n") for text in by_name.values())


# --------------------------------------------------------------------------- kernel headers

RELEASE = "6.18.44-fc-v595"


def _headers(src, version: str, arch: str = "amd64", kernel_release: str | None = None) -> str:
    build = src / f"linux-headers-{version}-{arch}"
    (build / "include" / "config").mkdir(parents=True)
    if kernel_release:
        (build / "include" / "config" / "kernel.release").write_text(kernel_release + "\n")
    (src / f"linux-headers-{version}-common" / "include" / "linux").mkdir(parents=True)
    return str(build)


def _link(tmp_path, release: str, build: str, with_source: bool = True):
    mod = tmp_path / "modules" / release
    mod.mkdir(parents=True)
    os.symlink(build, mod / "build")
    if with_source:
        os.symlink(re.sub(r"-amd64$", "-common", build), mod / "source")
    return mod


def _diag(tmp_path, release=RELEASE, **kw):
    kw.setdefault("kheaders", str(tmp_path / "no-kheaders"))
    return diagnose_kernel_headers(
        release=release, machine="x86_64", modules_root=str(tmp_path / "modules"),
        src_root=str(tmp_path / "src"), **kw,
    )


def test_headers_missing_explains_the_two_links(tmp_path):
    src = tmp_path / "src"
    _headers(src, "6.1.0-9")
    newest = _headers(src, "6.1.0-56")
    (tmp_path / "modules").mkdir()
    r = _diag(tmp_path)
    assert (r.name, r.status, r.required) == ("kernel-headers", MISSING, False)
    assert newest in r.detail
    mod = tmp_path / "modules" / RELEASE
    assert f"ln -sfn {newest} {mod}/build" in r.hint  # natural sort: -56 is newer than -9
    assert f"ln -sfn {src}/linux-headers-6.1.0-56-common {mod}/source" in r.hint
    assert "./quickstart" in r.hint


def test_headers_missing_without_candidates(tmp_path):
    (tmp_path / "src").mkdir()
    r = _diag(tmp_path)
    assert r.status == MISSING and f"linux-headers-{RELEASE}" in r.hint
    assert "linux-headers-*-amd64" in r.detail


def test_headers_missing_but_kheaders(tmp_path):
    (tmp_path / "src").mkdir()
    kh = tmp_path / "kheaders.tar.xz"
    kh.write_bytes(b"")
    r = _diag(tmp_path, kheaders=str(kh))
    assert r.status == DEGRADED and str(kh) in r.detail


def test_headers_dangling_link(tmp_path):
    mod = _link(tmp_path, RELEASE, str(tmp_path / "src" / "gone-amd64"), with_source=False)
    r = _diag(tmp_path)
    assert r.status == MISSING and "does not exist" in r.detail and f"rm {mod}/build" in r.hint


def test_headers_matching(tmp_path):
    build = _headers(tmp_path / "src", "6.1.0-56", kernel_release="6.1.0-56-amd64")
    _link(tmp_path, "6.1.0-56-amd64", build)
    r = _diag(tmp_path, release="6.1.0-56-amd64", compile_ok=None)
    assert r.status == OK and "match the running kernel" in r.detail and build in r.detail


def test_headers_mismatch_that_compiles_is_ok_with_a_note(tmp_path):
    # this VM: Debian 6.1 headers linked for a 6.18 kernel, and bcc compiles with them
    build = _headers(tmp_path / "src", "6.1.0-56", kernel_release="6.1.192")
    _link(tmp_path, RELEASE, build)
    r = _diag(tmp_path, compile_ok=True)
    assert r.status == OK and r.hint == ""
    assert "version mismatch" in r.detail and RELEASE in r.detail and "6.1.0-56-amd64" in r.detail
    assert "6.1.192" in r.detail and "compiled" in r.detail


@pytest.mark.parametrize("compile_ok", [False, None])
def test_headers_mismatch_not_proven_is_degraded(tmp_path, compile_ok):
    build = _headers(tmp_path / "src", "6.1.0-56")
    _link(tmp_path, RELEASE, build)
    r = _diag(tmp_path, compile_ok=compile_ok)
    assert r.status == DEGRADED and "version mismatch" in r.detail
    assert f"linux-headers-{RELEASE}" in r.hint


def test_headers_build_without_source_link(tmp_path):
    build = _headers(tmp_path / "src", "6.1.0-56")
    mod = _link(tmp_path, RELEASE, build, with_source=False)
    r = _diag(tmp_path, compile_ok=False)
    assert r.status == DEGRADED
    assert f"ln -sfn {tmp_path}/src/linux-headers-6.1.0-56-common {mod}/source" in r.hint


# --------------------------------------------------------------------------- cgroups

HYBRID = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
UNIFIED = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
"""
LEGACY = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"


def _mountinfo(tmp_path, text: str) -> str:
    p = tmp_path / "mountinfo"
    p.write_text(text)
    return str(p)


def test_find_cgroup2_mount_layouts(tmp_path):
    assert cgroups.find_cgroup2_mount(_mountinfo(tmp_path, HYBRID)) == "/sys/fs/cgroup/unified"
    assert cgroups.cgroup_layout(str(tmp_path / "mountinfo")) == "hybrid"
    assert cgroups.find_cgroup2_mount(_mountinfo(tmp_path, UNIFIED)) == "/sys/fs/cgroup"
    assert cgroups.cgroup_layout(str(tmp_path / "mountinfo")) == "unified"
    assert cgroups.find_cgroup2_mount(_mountinfo(tmp_path, LEGACY)) is None
    assert cgroups.cgroup_layout(str(tmp_path / "mountinfo")) == "legacy"
    assert cgroups.find_cgroup2_mount(str(tmp_path / "nonexistent")) is None
    assert cgroups.cgroup_layout(str(tmp_path / "nonexistent")) == "none"


def test_find_cgroup2_mount_details(tmp_path):
    # optional fields, an escaped space, a bind mount of a subdirectory listed first
    text = (
        "50 1 0:40 /kubepods /var/lib/x rw shared:9 master:2 - cgroup2 cgroup2 rw\n"
        "51 1 0:40 / /mnt/my\\040cgroup rw shared:10 - cgroup2 none rw\n"
        "garbage line without separator\n"
    )
    mi = _mountinfo(tmp_path, text)
    assert cgroups.find_cgroup2_mount(mi) == "/mnt/my cgroup"
    assert cgroups.cgroup2_mounts(mi) == ["/mnt/my cgroup", "/var/lib/x"]
    # a later mount on the same point hides the cgroup2 one
    mi = _mountinfo(tmp_path, UNIFIED + "60 25 0:50 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
    assert cgroups.find_cgroup2_mount(mi) is None


def test_find_cgroup2_mount_default_reads_proc_self():
    # agrees with a plain reading of this process's mountinfo
    with open("/proc/self/mountinfo") as f:
        v2 = [ln.split(" - ")[0].split()[4] for ln in f if " - cgroup2 " in ln]
    found = cgroups.find_cgroup2_mount()
    assert (found is None) == (not v2)
    if found:
        assert found in v2


def test_check_cgroup2(tmp_path):
    r = preflight.check_cgroup2(_mountinfo(tmp_path, LEGACY))
    assert (r.status, r.required) == (MISSING, True) and "legacy" in r.detail
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cgroup.controllers").write_text("")
    r = preflight.check_cgroup2(_mountinfo(tmp_path, LEGACY + f"41 31 0:38 / {cg} rw - cgroup2 cgroup2 rw\n"))
    assert r.status == OK and str(cg) in r.detail and "hybrid" in r.detail


# --------------------------------------------------------------------------- bpf, bcc, tools


def test_return_one_program_encoding():
    insns = preflight._RETURN_ONE
    assert len(insns) == 16
    # r0 = 1: BPF_ALU64|BPF_MOV|BPF_K, dst r0, imm 1;  exit: BPF_JMP|BPF_EXIT
    assert insns[0] == 0xB7 and insns[1] == 0 and int.from_bytes(insns[4:8], "little") == 1
    assert insns[8] == 0x95


def test_bcc_results_from_probe():
    missing = {"import_error": "ModuleNotFoundError: No module named 'bcc'"}
    assert preflight.check_bcc(missing).status == MISSING
    assert "python3-bpfcc" in preflight.check_bcc(missing).hint
    assert preflight.check_bcc_compile(missing).status == MISSING
    good = {"file": "/usr/lib/python3/dist-packages/bcc/__init__.py", "version": "0.26.0",
            "compiled": True, "loaded": True, "seconds": 0.4, "stderr": ""}
    r = preflight.check_bcc(good)
    assert r.status == OK and "0.26.0" in r.detail and good["file"] in r.detail
    assert preflight.check_bcc_compile(good).status == OK
    failed = {"file": "x", "version": "0.26.0", "error": "Exception: Failed to compile BPF module",
              "stderr": "<built-in>:1: fatal error: 'linux/kconfig.h' file not found\n"}
    r = preflight.check_bcc_compile(failed)
    assert r.status == MISSING and "kconfig.h" in r.detail and "kernel-headers" in r.hint


def test_missing_tool_is_optional(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    _fake_bin(tmp_path, "curl", 'echo "curl 7.88.1 (x86_64-pc-linux-gnu) libcurl/7.88.1"')
    _fake_bin(tmp_path, "bpftool", 'echo "WARNING: bpftool not found for kernel" >&2; exit 2')
    by_name = {r.name: r for r in preflight.check_tools()}
    assert list(by_name) == ["curl", "nghttp", "h2load", "openssl", "tcpdump", "bpftool"]
    assert by_name["curl"].status == OK and "curl 7.88.1" in by_name["curl"].detail
    assert by_name["h2load"].status == MISSING and "nghttp2-client" in by_name["h2load"].hint
    assert by_name["bpftool"].status == DEGRADED and "not found for kernel" in by_name["bpftool"].detail
    assert not any(r.required for r in by_name.values())


# --------------------------------------------------------------------------- robustness


def test_run_timeout_kills_and_raises():
    t0 = time.monotonic()
    with pytest.raises(preflight.ProbeError, match="did not finish"):
        preflight._run(["sh", "-c", "sleep 30 & sleep 30"], timeout=0.3)
    assert time.monotonic() - t0 < 5


def test_guard_turns_exceptions_into_missing():
    def boom():
        raise RuntimeError("kaboom")

    (r,) = preflight._guard([("netns", True)], boom)
    assert (r.name, r.status, r.required) == ("netns", MISSING, True)
    assert "RuntimeError: kaboom" in r.detail and r.hint

    def slow():
        raise preflight.ProbeError("`ip netns add x` did not finish within 5s (killed)")

    rs = preflight._guard([("a", False), ("b", True)], slow)
    assert [(r.name, r.required, r.status) for r in rs] == [("a", False, MISSING), ("b", True, MISSING)]
    assert "did not finish" in rs[0].detail


def test_run_checks_never_raises(monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("probe exploded")

    for fn in [
        "check_privileges", "check_netns", "check_iptables", "check_iptables_features",
        "check_policy_routing", "check_cgroup2", "check_bpf_privileges", "check_bpf_syscall",
        "check_btf", "check_bpf_prog_types", "check_bpf_sockhash", "probe_bcc", "check_bcc", "diagnose_kernel_headers",
        "check_bcc_compile", "check_tools", "remove_stale_check_namespaces",
    ]:
        monkeypatch.setattr(preflight, fn, boom)
    results = preflight.run_checks()
    assert [r.name for r in results] == EXPECTED_NAMES
    assert all(r.status == MISSING and "probe exploded" in r.detail for r in results)
    assert exit_code(results) == 1


# --------------------------------------------------------------------------- rendering

SAMPLE = [
    CheckResult("privileges", OK, "uid 0", "", True),
    CheckResult("iptables", DEGRADED, "iptables v1.8.7 (legacy)", "switch to nft", True),
    CheckResult("bpf-sk-msg", MISSING, "loading sk_msg failed:\nEPERM", "run as root", False),
]


def test_format_table_one_line_per_item():
    text = format_table(SAMPLE)
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["ok", "privileges", "uid", "0"]
    assert lines[1].startswith("degraded") and "iptables v1.8.7 (legacy)" in lines[1]
    assert "switch to nft" in lines[1] and "[required]" in lines[1]
    assert "loading sk_msg failed: EPERM" in lines[2] and "run as root" in lines[2] and "[optional]" in lines[2]
    # names line up
    assert len({ln.index(r.name) for ln, r in zip(lines, SAMPLE)}) == 1
    assert format_table([]) == ""


def test_to_json_and_exit_code():
    data = json.loads(to_json(SAMPLE))
    assert data["ok"] is True  # a degraded required item and a missing optional one do not fail
    assert data["checks"][1] == {
        "name": "iptables", "status": "degraded", "detail": "iptables v1.8.7 (legacy)",
        "hint": "switch to nft", "required": True,
    }
    assert exit_code(SAMPLE) == 0
    failing = SAMPLE + [CheckResult("netns", MISSING, "cannot create", "run as root", True)]
    assert exit_code(failing) == 1
    assert json.loads(to_json(failing))["ok"] is False
    assert exit_code([]) == 0


# --------------------------------------------------------------------------- as root, for real

EXPECTED_NAMES = [
    "privileges", "netns", "iptables",
    "iptables-redirect", "iptables-mark", "iptables-owner", "iptables-tproxy", "iptables-socket",
    "policy-routing", "cgroup2", "bpf-privileges", "bpf-syscall", "kernel-btf",
    "bpf-cgroup-connect4", "bpf-sockops", "bpf-sk-msg", "bpf-cgroup-getsockopt", "bpf-sk-lookup",
    "bpf-sockhash-sk-msg", "bcc", "kernel-headers", "bcc-compile",
    "curl", "nghttp", "h2load", "openssl", "tcpdump", "bpftool",
]


def _require_root():
    if os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("the preflight root test must run in CI (CI=true) but this is not root")
    pytest.skip("needs root: creates network namespaces and loads eBPF programs")


def _sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout


def _root_netns_state() -> dict[str, str]:
    """What the check must not change in the root network namespace (counters stripped)."""
    state = {}
    for tool in ("iptables-save", "ip6tables-save"):
        if shutil.which(tool):
            out = _sh(tool)
            out = "\n".join(ln for ln in out.splitlines() if not ln.startswith("#"))
            state[tool] = re.sub(r"\[\d+:\d+\]", "[]", out)
    state["ip rule"] = _sh("ip", "rule", "show") + _sh("ip", "-6", "rule", "show")
    state["ip route main"] = _sh("ip", "route", "show", "table", "main")
    return state


def _our_namespaces() -> list[str]:
    prefix = f"{preflight.NETNS_PREFIX}{os.getpid()}"
    try:
        return [n for n in os.listdir(preflight.NETNS_DIR) if n == prefix or n.startswith(prefix + "-")]
    except FileNotFoundError:
        return []


@pytest.mark.lab
def test_run_checks_as_root_is_truthful():
    _require_root()
    before = _root_netns_state()
    t0 = time.monotonic()
    results = preflight.run_checks()
    took = time.monotonic() - t0
    after = _root_netns_state()

    by = {r.name: r for r in results}
    report = format_table(results)
    assert [r.name for r in results] == EXPECTED_NAMES, report
    assert took < 20, f"run_checks took {took:.1f}s\n{report}"
    assert all(r.status in (OK, MISSING, DEGRADED) for r in results)
    assert all((r.hint == "") == (r.status == OK) for r in results), report

    # nothing left behind, nothing changed outside the throwaway namespaces
    assert _our_namespaces() == []
    assert after == before

    # root: privileges and namespaces work
    assert by["privileges"].status == OK and "CAP_NET_ADMIN" in by["privileges"].detail
    assert by["netns"].status == OK, report
    assert f"hm-check-{os.getpid()}" in by["netns"].detail

    # cgroup2: the path agrees with /proc/self/mountinfo read independently
    with open("/proc/self/mountinfo") as f:
        v2 = [ln.split(" - ")[0].split()[4] for ln in f if " - cgroup2 " in ln]
    if v2:
        path = cgroups.find_cgroup2_mount()
        assert path in v2 and path in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
        assert by["cgroup2"].status == OK and f"cgroup2 at {path} " in by["cgroup2"].detail
        assert ("hybrid" in by["cgroup2"].detail) == (path == "/sys/fs/cgroup/unified")
    else:
        assert by["cgroup2"].status == MISSING

    # iptables: backend as `iptables -V` says, and every extension we call ok is registered
    if shutil.which("iptables"):
        version_line = _sh("iptables", "-V").strip()
        assert version_line in by["iptables"].detail
        assert by["iptables"].status == (OK if "nf_tables" in version_line else DEGRADED)
        registered = set()
        for f in ("/proc/net/ip_tables_targets", "/proc/net/ip_tables_matches"):
            if os.path.exists(f):
                registered |= set(open(f).read().split())
        if registered:
            for name, ext in [("iptables-redirect", "REDIRECT"), ("iptables-tproxy", "TPROXY"),
                              ("iptables-owner", "owner"), ("iptables-socket", "socket"),
                              ("iptables-mark", "mark")]:
                if by[name].status == OK:
                    assert ext in registered, f"{name} reported ok but {ext} is not registered"
    else:
        assert by["iptables"].status == MISSING

    # eBPF program types agree with bpftool's own probe
    if shutil.which("bpftool"):
        try:
            feat = json.loads(_sh("bpftool", "-j", "feature", "probe", "kernel"))["program_types"]
        except (ValueError, KeyError):
            feat = None
        if feat:
            for name, key in [("bpf-cgroup-connect4", "have_cgroup_sock_addr_prog_type"),
                              ("bpf-sockops", "have_sock_ops_prog_type"),
                              ("bpf-sk-msg", "have_sk_msg_prog_type"),
                              ("bpf-cgroup-getsockopt", "have_cgroup_sockopt_prog_type"),
                              ("bpf-sk-lookup", "have_sk_lookup_prog_type")]:
                assert (by[name].status == OK) == bool(feat.get(key)), f"{name} vs bpftool {key}"
    maps = json.loads(_sh("bpftool", "-j", "feature", "probe", "kernel")).get("map_types", {}) \
        if shutil.which("bpftool") else {}
    if maps and by["bpf-sk-msg"].status == OK:
        assert (by["bpf-sockhash-sk-msg"].status == OK) == bool(maps.get("have_sockhash_map_type"))
    assert (by["kernel-btf"].status == OK) == os.path.exists("/sys/kernel/btf/vmlinux")

    # bcc and headers
    has_bcc = subprocess.run([sys.executable, "-c", "import bcc"], capture_output=True, timeout=30).returncode == 0
    assert (by["bcc"].status == OK) == has_bcc
    build = f"/lib/modules/{os.uname().release}/build"
    if os.path.isdir(build):
        assert os.path.realpath(build) in by["kernel-headers"].detail
        if by["bcc-compile"].status == OK and os.uname().release not in os.path.realpath(build):
            # e.g. this VM: 6.1 headers for a 6.18 kernel, which compile fine
            assert by["kernel-headers"].status == OK
            assert "version mismatch" in by["kernel-headers"].detail
    else:
        assert by["kernel-headers"].status in (MISSING, DEGRADED)

    # tools
    for tool in ("curl", "nghttp", "h2load", "openssl", "tcpdump", "bpftool"):
        assert (by[tool].status != MISSING) == bool(shutil.which(tool)), tool
        assert not by[tool].required

    expected_exit = 1 if any(r.required and r.status == MISSING for r in results) else 0
    assert exit_code(results) == expected_exit
    print(report)


@pytest.mark.lab
def test_stale_check_namespaces_are_removed_only_for_dead_pids():
    _require_root()
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "30"])
    stale, live = f"hm-check-{dead.pid}-ipt", f"hm-check-{alive.pid}"
    try:
        for n in (stale, live):
            subprocess.run(["ip", "netns", "add", n], check=True, timeout=10)
        removed = preflight.remove_stale_check_namespaces()
        assert stale in removed
        assert not os.path.exists(f"/run/netns/{stale}")
        assert os.path.exists(f"/run/netns/{live}")
    finally:
        alive.kill()
        alive.wait()
        for n in (stale, live):
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=10)


@pytest.mark.lab
def test_throwaway_netns_is_deleted_on_error():
    _require_root()
    name = preflight._netns_name("err")
    with pytest.raises(RuntimeError):
        with preflight._throwaway_netns(name):
            assert os.path.exists(f"/run/netns/{name}")
            raise RuntimeError("probe failed midway")
    assert not os.path.lexists(f"/run/netns/{name}")



def test_sockhash_check_names_the_failing_step(monkeypatch):
    def refuse_map(cmd, attr):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(preflight, "_bpf", refuse_map)
    r = preflight.check_bpf_sockhash()
    assert r.name == "bpf-sockhash-sk-msg" and r.status == MISSING and not r.required
    assert "creating a BPF_MAP_TYPE_SOCKHASH: Invalid argument" in r.detail
    assert "capture.accelerate" in r.hint

    calls = []

    def refuse_attach(cmd, attr):
        calls.append(cmd)
        if cmd == preflight.BPF_PROG_ATTACH:
            raise OSError(errno.EINVAL, "Invalid argument")
        return os.open("/dev/null", os.O_RDONLY)  # a real fd the check closes again

    monkeypatch.setattr(preflight, "_bpf", refuse_attach)
    r = preflight.check_bpf_sockhash()
    assert r.status == MISSING and "attaching sk_msg to the sockhash (BPF_SK_MSG_VERDICT)" in r.detail
    assert calls == [preflight.BPF_MAP_CREATE, preflight.BPF_PROG_LOAD, preflight.BPF_PROG_ATTACH]
