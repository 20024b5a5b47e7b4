"""Bootstrap config: every malformed input is refused with a message naming the field."""

import argparse

import pytest

from nodeagent import bootstrap
from nodeagent.errors import ConfigError

GOOD = """
node: node1
controlPlane: 198.18.0.2:15010
controlPlaneAuth:
  tokenFile: /etc/hostmesh/node.token
  rootBundle: /etc/hostmesh/root-cert.pem
capture:
  mode: iptables
  podCIDRs: [198.18.1.0/24]
  meshCIDRs: [198.19.0.0/16, 198.18.1.0/24, 198.18.2.0/24]
admin:
  address: 127.0.0.1:15000
proxy:
  unknownDestination: refuse
  connectTimeout: 250ms
  idleTimeout: 10m
  socketMark: "0x539"
drainGrace: 2s
"""


def load(tmp_path, text, **overrides):
    f = tmp_path / "agent.yaml"
    f.write_text(text)
    return bootstrap.build(bootstrap.load_file(str(f)), overrides)


def test_good_file(tmp_path):
    b = load(tmp_path, GOOD)
    assert b.node == "node1"
    assert b.pod_cidrs == ("198.18.1.0/24",)
    assert b.unknown_destination == "refuse"
    assert b.connect_timeout == 0.25 and b.idle_timeout == 600 and b.drain_grace == 2
    assert b.socket_mark == 0x539
    assert (b.admin_host, b.admin_port) == ("127.0.0.1", 15000)


def test_flags_override_the_file(tmp_path):
    b = load(tmp_path, GOOD, **{"node": "node2", "capture.mode": "none"})
    assert (b.node, b.capture_mode) == ("node2", "none")


@pytest.mark.parametrize("text,message", [
    ("node: [x", "line 1 column 9: invalid YAML"),
    ("- a\n- b\n", "the bootstrap file must be a mapping, got list"),
    ("node: n1\ncaptrue: {}\n", "captrue: unknown field"),
    ("node: n1\ncapture:\n  mode: magic\n  podCIDRs: [198.18.1.0/24]\n  meshCIDRs: [198.19.0.0/16]\n",
     "capture.mode: 'magic' is not a capture mode (valid: iptables, ebpf, auto, none)"),
    ("node: n1\ncapture:\n  podCIDRs: [198.18.1.1/24]\n", "capture.podCIDRs[0]: '198.18.1.1/24' is not an IPv4 CIDR"),
    ("node: n1\nproxy:\n  outboundPort: 70000\n", "proxy.outboundPort: 70000 is out of range 1-65535"),
    ("node: n1\nproxy:\n  connectTimeout: soon\n", "proxy.connectTimeout: 'soon' is not a duration"),
    ("node: n1\nproxy:\n  idleTimeout: 0s\n", "proxy.idleTimeout: must be greater than zero"),
    ("node: n1\nadmin:\n  address: localhost\n", "admin.address: 'localhost' is not an IPv4 address:port"),
    ("node: n1\nproxy: 3\n", "proxy: must be a mapping"),
    ("capture: {mode: none}\n", "node: is required"),
    ("node: n1\n", "capture: podCIDRs and meshCIDRs are required"),
    ("node: n1\ncapture: {mode: none}\n", "controlPlane: is required (--control-plane HOST:PORT)"),
    ("node: n1\ncapture: {mode: none}\ncontrolPlane: cp\n", "controlPlane: 'cp' is not a host:port address"),
    ("node: n1\ncapture: {mode: none}\nproxy: {outboundPort: 15000}\n", "ports must differ"),
    ("node: n1\ncapture: {mode: none}\nproxy: {unknownDestination: drop}\n", "'drop' is not valid (valid: passthrough, refuse)"),
])
def test_bad_files(tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text)
    assert message in str(exc.value)


def test_all_errors_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, "node: n1\nbogus: 1\nproxy: {outboundPort: 0, connectTimeout: x}\n")
    text = str(exc.value)
    assert "bogus: unknown field" in text and "proxy.outboundPort" in text and "proxy.connectTimeout" in text


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read bootstrap file"):
        bootstrap.load_file(str(tmp_path / "nope.yaml"))


def test_flag_values_are_checked():
    args = argparse.Namespace(node="n1", capture=None, snapshot=None, unknown_destination=None, control_plane=None,
                              agent_log_level=None, state_dir=None, pod_cidr=["198.18.1.0/33"],
                              mesh_cidr=None, admin_address="127.0.0.1:99999", drain_grace=None)
    with pytest.raises(ConfigError) as exc:
        bootstrap.flag_overrides(args)
    assert "--pod-cidr[0]: '198.18.1.0/33'" in str(exc.value)
    assert "--admin-address: '127.0.0.1:99999'" in str(exc.value)


CP_ONLY = "node: n1\ncapture: {mode: none}\ncontrolPlane: 198.18.0.2:15010\n"


@pytest.mark.parametrize("extra,message", [
    ("", "controlPlaneAuth.tokenFile: is required (--token-file)"),
    ("", "controlPlaneAuth.rootBundle: is required (--root-bundle)"),
    ("controlPlaneAuth: {insecure: yes please}\n", "controlPlaneAuth.insecure: must be true or false"),
    ("controlPlaneAuth: {insecure: true, tokenFile: /t}\n", "not allowed with insecure: true"),
    ("controlPlaneAuth: {tokenFile: /t, rootBundle: /b}\ncertDir: certs\n", "certDir: must be an absolute path"),
    ("controlPlaneAuth: {tokenFile: /t, rootBundle: /b, token: x}\n", "controlPlaneAuth.token: unknown field"),
])
def test_control_plane_auth_is_required_and_checked(tmp_path, extra, message):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, CP_ONLY + extra)
    assert message in str(exc.value)


def test_control_plane_auth_values(tmp_path):
    b = load(tmp_path, CP_ONLY + "controlPlaneAuth: {tokenFile: /t, rootBundle: /b, serverName: cp.example}\n")
    assert (b.cp_token_file, b.cp_root_bundle, b.cp_server_name, b.cp_insecure) == ("/t", "/b", "cp.example", False)
    assert b.cert_dir == "/run/hostmesh/n1/certs"
    assert b.to_dict()["controlPlaneAuth"]["tokenFile"] == "/t"
    b = load(tmp_path, CP_ONLY + "controlPlaneAuth: {insecure: true}\ncertDir: /run/x\n")
    assert b.cp_insecure and b.cert_dir == "/run/x"
    # a static snapshot needs no control-plane credentials
    load(tmp_path, "node: n1\ncapture: {mode: none}\nsnapshotFile: /s.json\n")
