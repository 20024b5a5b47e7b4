"""The shipped systemd units (hostmesh/systemd/, the repository's systemd/ links to it):
`systemd-analyze verify` accepts them as `hostmesh install` puts them in place, the sample
agent.yaml loads with the agent's own loader, the agent unit grants what `hostmesh check`
looks for and writes where the agent writes, and its timeouts fit the agent's drain."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hostmesh import hostinstall
from meshlab.supervisor import load_unit, parse_unit
from nodeagent import bootstrap, preflight
from nodeagent.capture.ebpf_loader import PIN_ROOT
from tests.conftest import HOSTMESH
from tests.test_hostinstall import agent_args, install, sources  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "hostmesh" / "systemd"
AGENT_UNIT = UNITS / "hostmesh-agent.service"
CP_UNIT = UNITS / "hostmesh-controlplane.service"


def service(path: Path) -> dict[str, list[str]]:
    return parse_unit(path.read_text())["Service"]


def test_one_copy_of_the_units():
    link = REPO / "systemd"
    assert link.is_symlink() and link.resolve() == UNITS.resolve()
    assert sorted(p.name for p in UNITS.iterdir()) == ["agent.yaml", "hostmesh-agent.service",
                                                      "hostmesh-controlplane.service", "hostmesh.conf"]
    assert "systemd/*" in (REPO / "pyproject.toml").read_text()  # shipped as package data


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_installed_units(tmp_path, sources):
    """verify needs no running systemd, but ExecStart= must exist: the units are verified
    where install put them, under a root, so their ExecStart is the installed link."""
    root = tmp_path / "root"
    root.mkdir()
    assert install(agent_args(sources, root)) == 0
    assert install(["--role", "controlplane", "--root", str(root), "--node-tokens", str(sources["tokens"]),
                    "--tls-san", "192.168.56.10"]) == 0
    for name in ("hostmesh-agent.service", "hostmesh-controlplane.service"):
        path = root / "etc/systemd/system" / name
        r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and r.stderr.strip() == "" and r.stdout.strip() == "", (name, r.stdout, r.stderr)
        # the installed unit is the packaged one with our paths under the root, nothing else
        assert path.read_text() == hostinstall.relocate((UNITS / name).read_text(), str(root))


def test_the_sample_agent_yaml_loads_with_the_agents_loader():
    boot = bootstrap.build(bootstrap.load_file(str(UNITS / "agent.yaml")), {})
    assert boot.node == "worker1" and boot.control_plane
    assert boot.state_dir == hostinstall.STATE and boot.cp_token_file == f"{hostinstall.ETC}/token"
    assert boot.cert_dir.startswith(hostinstall.RUN + "/")
    # the unit runs the agent on the file install writes
    assert load_unit(AGENT_UNIT).exec_start == (hostinstall.BIN, "agent", "--config", hostinstall.AGENT_YAML)


def test_the_agent_unit_grants_every_capability_hostmesh_check_looks_for():
    wanted = set(preflight.cap_names((1 << 64) - 1))  # every capability preflight names
    svc = service(AGENT_UNIT)
    bounding = set(" ".join(svc["CapabilityBoundingSet"]).split())
    ambient = set(" ".join(svc["AmbientCapabilities"]).split())
    assert wanted <= bounding, wanted - bounding
    assert ambient == bounding
    assert svc["NoNewPrivileges"] == ["yes"] and svc["ProtectSystem"] == ["strict"]


def test_the_agent_unit_lets_the_agent_write_where_it_writes():
    boot = bootstrap.build(bootstrap.load_file(str(UNITS / "agent.yaml")), {})
    writable = [p.lstrip("-") for p in " ".join(service(AGENT_UNIT)["ReadWritePaths"]).split()]

    def covered(path: str) -> bool:
        return any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable)

    for path in (boot.state_dir, boot.cert_dir, PIN_ROOT, "/run/xtables.lock"):
        assert covered(path), path
    # and tmpfiles.d creates them before the unit starts (ReadWritePaths= needs them to exist)
    tmpfiles = (UNITS / "hostmesh.conf").read_text().splitlines()
    created = {line.split()[1] for line in tmpfiles if line and not line.startswith("#")}
    assert {hostinstall.STATE, hostinstall.RUN, "/run/xtables.lock"} <= created


def test_timeouts_fit_the_agents_drain():
    spec = load_unit(AGENT_UNIT)
    boot = bootstrap.build(bootstrap.load_file(str(UNITS / "agent.yaml")), {})
    default_drain = bootstrap.parse_duration(
        next(a.default for a in _install_parser()._actions if a.dest == "drain_grace"), "drainGrace")
    assert spec.timeout_stop > boot.drain_grace + 5 and spec.timeout_stop > default_drain + 5
    assert spec.watchdog and spec.timeout_abort and spec.restart_sec
    assert spec.type == "notify" and spec.notify_access == "main" and spec.restart == "on-failure"
    assert spec.kill_mode == "mixed"  # SIGTERM to the agent, which drains its workers itself


def test_the_controlplane_units_command_line_is_accepted_by_the_cli(tmp_path, sources):
    """As installed: ExecStart= with $HOSTMESH_CONTROLPLANE_ARGS from the installed
    controlplane.env, parsed by the CLI's own parser, names the installed directories."""
    from hostmesh.cli import build_parser
    root = tmp_path / "root"
    root.mkdir()
    assert install(["--role", "controlplane", "--root", str(root), "--node-tokens", str(sources["tokens"]),
                    "--tls-san", "192.168.56.10", "--tls-san", "cp.example"]) == 0
    argv = load_unit(root / "etc/systemd/system/hostmesh-controlplane.service").exec_start
    assert Path(argv[0]) == root / hostinstall.BIN.lstrip("/")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "controlplane" and args.tls_san == ["192.168.56.10", "cp.example"]
    for given, path in ((args.config_dir, "etc/hostmesh/config"), (args.ca_dir, "var/lib/hostmesh/ca"),
                        (args.node_tokens, "etc/hostmesh/tokens")):
        assert given == str(root / path) and Path(given).is_dir()
    assert sorted(p.name for p in Path(args.node_tokens).iterdir()) == ["worker1.token", "worker2.token"]
    assert service(CP_UNIT)["CapabilityBoundingSet"] == [""]  # no capabilities at all
    assert f"{hostinstall.STATE}/ca" in service(CP_UNIT)["ReadWritePaths"]


def _install_parser():
    import argparse
    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    hostinstall.register(sub)
    return sub.choices["install"]


def test_the_cli_binary_exists():
    assert Path(HOSTMESH).exists()  # what install links /usr/local/bin/hostmesh to in these tests


def test_install_with_etcd_makes_the_unit_read_etcd_instead_of_the_directory(tmp_path, sources):
    from hostmesh.cli import build_parser
    root = tmp_path / "root"
    root.mkdir()
    assert install(["--role", "controlplane", "--root", str(root), "--node-tokens", str(sources["tokens"]),
                    "--etcd", "10.0.0.5:2379,10.0.0.6:2379", "--replica", "cp-a", "--tls-san", "cp-a.example"]) == 0
    argv = load_unit(root / "etc/systemd/system/hostmesh-controlplane.service").exec_start
    args = build_parser().parse_args(argv[1:])
    assert args.etcd == "10.0.0.5:2379,10.0.0.6:2379" and args.replica == "cp-a" and args.config_dir is None


def test_install_refuses_a_bad_etcd_endpoint(tmp_path, sources, capsys):
    root = tmp_path / "root"
    root.mkdir()
    assert install(["--role", "controlplane", "--root", str(root), "--node-tokens", str(sources["tokens"]),
                    "--etcd", "10.0.0.5"]) == 1
    assert "--etcd: etcd endpoint '10.0.0.5' is not host:port" in capsys.readouterr().err
    assert list(root.iterdir()) == []
