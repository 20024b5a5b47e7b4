"""`hostmesh install` / `hostmesh uninstall` under a root directory (no root privileges):
idempotent, dry-run changes nothing, uninstall removes exactly what install put there,
modes are exact, bad input writes nothing, files install did not write are never
overwritten or removed, and the systemctl steps come in the right order."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from pathlib import Path

import pytest
import yaml

from hostmesh import hostinstall
from hostmesh.cli import main
from hostmesh.hostinstall import Installer, InstallError
from nodeagent import bootstrap
from tests.conftest import HOSTMESH


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """What an operator copies from the control-plane host: a token, the root bundle, tokens."""
    from controlplane import ca
    d = tmp_path_factory.mktemp("sources")
    (d / "token").write_text(secrets.token_urlsafe(32) + "\n")
    (d / "token").chmod(0o644)  # a copy on a shared folder: install makes its own 0600 copy
    (d / "bundle.pem").write_text(ca.CertificateAuthority(d / "ca").trust_bundle_pem)
    tokens = d / "tokens"
    tokens.mkdir()
    for node in ("worker1", "worker2"):
        (tokens / f"{node}.token").write_text(secrets.token_urlsafe(32) + "\n")
    return {"token": d / "token", "bundle": d / "bundle.pem", "tokens": tokens}


def agent_args(src: dict, root: Path, *extra: str) -> list[str]:
    return ["--root", str(root), "--node", "worker1", "--control-plane", "192.168.56.10:15010,192.168.56.11:15010",
            "--token-file", str(src["token"]), "--root-bundle", str(src["bundle"]), "--pod-cidr", "10.244.1.0/24",
            "--mesh-cidr", "10.96.0.0/16", "--mesh-cidr", "10.244.0.0/16", "--bin", HOSTMESH, *extra]


def install(args: list[str]) -> int:
    return main(["install", *args])


def uninstall(root: Path, *extra: str) -> int:
    return main(["uninstall", "--root", str(root), *extra])


def tree(root: Path, *, mtimes: bool = True) -> dict[str, tuple]:
    """Everything under root: kind, mode, content digest or link target, and (``mtimes``) when
    it last changed (a directory's changes whenever an entry is added or removed)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            st = p.lstat()
            if p.is_symlink():
                what = ("link", os.readlink(p))
            elif p.is_dir():
                what = ("dir",)
            else:
                what = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            out[str(p.relative_to(root))] = (*what, stat.S_IMODE(st.st_mode), *([st.st_mtime_ns] if mtimes else []))
    return out


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "etc" / "systemd" / "system").mkdir(parents=True)
    (r / "etc" / "hosts").write_text("127.0.0.1 localhost\n")  # the host's own: must survive
    (r / "etc" / "systemd" / "system" / "sshd.service").write_text("[Service]\nExecStart=/bin/true\n")
    return r


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_install_twice_is_no_change_and_touches_nothing(root, sources, capsys):
    assert install(agent_args(sources, root)) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "agent.yaml" in out and "not started" in out
    before = tree(root)
    assert install(agent_args(sources, root)) == 0
    assert capsys.readouterr().out.startswith("no change: hostmesh agent is installed as asked")
    assert tree(root) == before  # not even an mtime moved


def test_the_installed_tree(root, sources):
    old = os.umask(0)  # modes are exact whatever the umask
    try:
        assert install(agent_args(sources, root)) == 0
    finally:
        os.umask(old)
    etc = root / "etc" / "hostmesh"
    assert mode(etc / "token") == 0o600 and (etc / "token").read_text() == sources["token"].read_text()
    assert mode(etc / "root-bundle.pem") == 0o644 and mode(etc / "agent.yaml") == 0o644
    assert mode(root / "var/lib/hostmesh") == 0o700 and mode(root / "var/lib/hostmesh/install.json") == 0o600
    assert os.readlink(root / "usr/local/bin/hostmesh") == HOSTMESH
    # the bootstrap loads with the agent's loader, and every path in it is under the root
    boot = bootstrap.build(bootstrap.load_file(str(etc / "agent.yaml")), {})
    assert boot.control_plane == ("192.168.56.10:15010", "192.168.56.11:15010")
    assert yaml.safe_load((etc / "agent.yaml").read_text())["controlPlane"] == list(boot.control_plane)
    for path in (boot.cp_token_file, boot.cp_root_bundle, boot.state_dir, boot.cert_dir):
        assert path.startswith(str(root) + "/"), path
    unit = (root / "etc/systemd/system/hostmesh-agent.service").read_text()
    assert f"ExecStart={root}/usr/local/bin/hostmesh agent --config {root}/etc/hostmesh/agent.yaml" in unit
    assert "/sys/fs/bpf" in unit and f"{root}/sys" not in unit  # only our paths move


def test_dry_run_changes_nothing(root, sources, capsys):
    before = tree(root)
    assert install(agent_args(sources, root, "--dry-run")) == 0
    out = capsys.readouterr().out
    assert f"would write {root}/etc/hostmesh/token (0600)" in out
    assert f"would link {root}/usr/local/bin/hostmesh -> {HOSTMESH}" in out
    assert tree(root) == before
    assert install(agent_args(sources, root)) == 0
    installed = tree(root)
    capsys.readouterr()
    assert install(agent_args(sources, root, "--drain-grace", "5s", "--dry-run")) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"would write {root}/etc/hostmesh/agent.yaml (0644)"
    assert uninstall(root, "--dry-run") == 0
    assert tree(root) == installed


def test_uninstall_leaves_exactly_what_was_there(root, sources, capsys):
    before = tree(root, mtimes=False)
    assert install(agent_args(sources, root)) == 0
    assert install(["--role", "controlplane", "--root", str(root), "--node-tokens", str(sources["tokens"]),
                    "--tls-san", "192.168.56.10", "--bin", HOSTMESH]) == 0
    assert mode(root / "etc/hostmesh/tokens/worker2.token") == 0o600
    assert uninstall(root, "--role", "agent") == 0
    # what the control plane still needs stays: the link, tmpfiles, the state dir
    assert (root / "usr/local/bin/hostmesh").is_symlink() and (root / "etc/tmpfiles.d/hostmesh.conf").exists()
    assert not (root / "etc/hostmesh/agent.yaml").exists() and (root / "var/lib/hostmesh/ca").is_dir()
    assert uninstall(root) == 0
    assert tree(root, mtimes=False) == before
    capsys.readouterr()
    assert uninstall(root) == 0  # again: nothing to do
    assert capsys.readouterr().out.startswith("nothing to uninstall")


def test_uninstall_keeps_what_changed_or_is_not_empty(root, sources, capsys):
    assert install(agent_args(sources, root)) == 0
    (root / "etc/hostmesh/agent.yaml").write_text("node: edited-by-hand\n")
    (root / "var/lib/hostmesh/snapshot.json").write_text("{}")  # the agent's state
    capsys.readouterr()
    assert uninstall(root) == 0
    out = capsys.readouterr().out
    assert f"kept {root}/etc/hostmesh/agent.yaml (changed since hostmesh install wrote it" in out
    assert f"kept {root}/var/lib/hostmesh (not empty: snapshot.json)" in out
    assert (root / "etc/hostmesh/agent.yaml").read_text() == "node: edited-by-hand\n"
    assert not (root / "etc/hostmesh/token").exists() and not (root / "usr").exists()


def test_files_install_did_not_write_are_not_overwritten(root, sources, capsys):
    (root / "etc/hostmesh").mkdir()
    (root / "etc/hostmesh/agent.yaml").write_text("node: theirs\n")
    before = tree(root)
    assert install(agent_args(sources, root)) == 1
    err = capsys.readouterr().err
    assert f"{root}/etc/hostmesh/agent.yaml was not written by hostmesh install; pass --force" in err
    assert tree(root) == before
    assert install(agent_args(sources, root, "--force")) == 0
    assert "node: worker1" in (root / "etc/hostmesh/agent.yaml").read_text()
    assert uninstall(root) == 0
    assert (root / "etc/hostmesh").is_dir()  # it existed before install: not ours to remove


@pytest.mark.parametrize("change,message", [
    ({"--token-file": "/nonexistent/token"}, "--token-file /nonexistent/token: cannot read the token: No such file"),
    ({"--node": "Worker_1"}, "--node 'Worker_1': a node name is a lowercase DNS name"),
    ({"--control-plane": "192.168.56.10"}, "--control-plane: '192.168.56.10' is not HOST:PORT"),
    ({"--control-plane": "192.168.56.10:15010,cp:99999"}, "--control-plane: 'cp:99999' is not HOST:PORT"),
    ({"--pod-cidr": "10.244.1.0/33"}, "the agent would refuse this bootstrap; nothing was written:\n"
                                      "agent.yaml: capture.podCIDRs[0]: '10.244.1.0/33' is not an IPv4 CIDR"),
    ({"--bin": "/nonexistent/hostmesh"}, "--bin /nonexistent/hostmesh: not an executable file"),
])
def test_bad_input_writes_nothing(root, sources, tmp_path, capsys, change, message):
    args = agent_args(sources, root)
    for flag, value in change.items():
        args[args.index(flag) + 1] = value
    before = tree(root)
    assert install(args) == 1
    assert message in capsys.readouterr().err
    assert tree(root) == before


def test_a_bad_root_bundle_or_token_writes_nothing(root, sources, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.write_text("not a certificate\n")
    before = tree(root)
    args = agent_args(sources, root)
    args[args.index("--root-bundle") + 1] = str(bad)
    assert install(args) == 1
    assert f"--root-bundle {bad}: not PEM certificates" in capsys.readouterr().err
    short = tmp_path / "short"
    short.write_text("abc\n")
    args = agent_args(sources, root)
    args[args.index("--token-file") + 1] = str(short)
    assert install(args) == 1
    assert "a token is 16-4096 characters without whitespace" in capsys.readouterr().err
    assert install(["--root", str(root)]) == 1  # no --node
    assert "--node NAME is required" in capsys.readouterr().err
    assert tree(root) == before


def test_systemctl_steps_when_systemd_runs(root, sources):
    """With systemd (injected here: the tests never call the real systemctl) install ends with
    daemon-reload, tmpfiles, enable, restart; uninstall stops the unit and removes capture
    before it removes a file, and stops if removing capture fails."""
    import argparse
    ran: list[list[str]] = []
    rc = {"value": 0}

    def run(argv):
        ran.append(argv)
        return rc["value"] if argv[-1:] == ["--uninstall"] else 0

    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    hostinstall.register(sub)
    args = sub.choices["install"].parse_args(agent_args(sources, root))
    inst = Installer(str(root), run=run, systemd=True, out=lambda _: None)
    inst.install("agent", hostinstall.desired(args, inst.root))
    assert ran == [["systemctl", "daemon-reload"], ["systemd-tmpfiles", "--create", "/etc/tmpfiles.d/hostmesh.conf"],
                   ["systemctl", "enable", "hostmesh-agent.service"], ["systemctl", "restart", "hostmesh-agent.service"]]
    ran.clear()
    inst.install("agent", hostinstall.desired(args, inst.root))
    assert ran == []  # no change: systemctl is not called either
    rc["value"] = 1  # `hostmesh agent --uninstall` refuses (an agent still runs)
    with pytest.raises(InstallError, match="--uninstall` failed"):
        inst.uninstall(None)
    assert (root / "etc/hostmesh/agent.yaml").exists()  # nothing removed
    ran.clear()
    rc["value"] = 0
    inst.uninstall(None)
    assert ran == [["systemctl", "disable", "--now", "hostmesh-agent.service"],
                   [f"{root}/usr/local/bin/hostmesh", "agent", "--config", f"{root}/etc/hostmesh/agent.yaml",
                    "--uninstall"],
                   ["systemctl", "daemon-reload"]]
    assert not (root / "etc/hostmesh").exists()


def test_relocate_moves_only_our_paths():
    text = ("ExecStart=/usr/local/bin/hostmesh agent --config /etc/hostmesh/agent.yaml\n"
            "ReadWritePaths=/var/lib/hostmesh /run/hostmesh /sys/fs/bpf -/run/xtables.lock\n"
            "EnvironmentFile=-/etc/hostmesh/controlplane.env\n"
            "# /etc/hostmeshd and /usr/local/bin/hostmesh-other are not ours\n")
    assert hostinstall.relocate(text, "/") == text
    assert hostinstall.relocate(text, "/srv/r") == (
        "ExecStart=/srv/r/usr/local/bin/hostmesh agent --config /srv/r/etc/hostmesh/agent.yaml\n"
        "ReadWritePaths=/srv/r/var/lib/hostmesh /srv/r/run/hostmesh /sys/fs/bpf -/run/xtables.lock\n"
        "EnvironmentFile=-/srv/r/etc/hostmesh/controlplane.env\n"
        "# /etc/hostmeshd and /usr/local/bin/hostmesh-other are not ours\n")
