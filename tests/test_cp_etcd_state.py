"""The etcd source without etcd: key layout, corrupt values, last-good-per-key, apply plans,
and the agent's endpoint rotation and bootstrap list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aetcd import rpc

from controlplane.apply import documents_by_key, plan_apply
from controlplane.errors import ConfigInvalid
from controlplane.etcd import EtcdError, parse_endpoints, prefix_end
from controlplane.sources.etcd import EtcdConfigState, check_value, object_key, split_key
from nodeagent import bootstrap
from nodeagent.errors import ConfigError
from nodeagent.endpoints import EndpointRotation

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "config"
P = "/hostmesh/"


def kv(key: str, value: bytes, rev: int) -> rpc.KeyValue:
    return rpc.KeyValue(key=key.encode(), value=value, mod_revision=rev, create_revision=rev)


def put(key: str, value: bytes, rev: int) -> rpc.Event:
    return rpc.Event(type=rpc.Event.PUT, kv=kv(key, value, rev))


def delete(key: str, rev: int) -> rpc.Event:
    return rpc.Event(type=rpc.Event.DELETE, kv=rpc.KeyValue(key=key.encode(), mod_revision=rev))


@pytest.fixture(scope="module")
def examples() -> dict[str, bytes]:
    return documents_by_key(str(EXAMPLES), P)


def state_of(docs: dict[str, bytes]) -> EtcdConfigState:
    st = EtcdConfigState(P)
    st.reset(10, [kv(k, v, 5) for k, v in docs.items()])
    return st


def service_key(examples) -> str:
    return next(k for k in examples if "/Service/" in k)


def test_keys_name_kind_namespace_and_name():
    assert object_key(P, "Service", "default", "web") == "/hostmesh/config/Service/default/web"
    assert split_key(P, "/hostmesh/config/Service/default/web") == ("Service", "default", "web")
    for bad in ("/hostmesh/config/Service/web", "/hostmesh/config/Service/default/web/x", "/other/Service/a/b",
                "/hostmesh/config//default/web"):
        assert split_key(P, bad) is None
    assert prefix_end(b"/hostmesh/config/") == b"/hostmesh/config0"
    assert prefix_end(b"a\xff") == b"b"


def test_the_examples_load_from_etcd_as_from_files(examples):
    result = state_of(examples).load()
    assert not result.errors
    assert result.model.counts()["Workload"] == 4


@pytest.mark.parametrize("value, why", [
    (b"kind: [", "YAML syntax error"),
    (b"\xff\xfe", "not valid UTF-8"),
    ("renamed", "its key names"),
    (b"apiVersion: hostmesh.io/v1alpha1\nkind: Nope\nmetadata: {name: web}\nspec: {}\n", "Nope"),
])
def test_a_corrupt_value_is_skipped_the_rest_served_and_its_last_good_object_kept(examples, value, why):
    key = service_key(examples)
    if value == "renamed":      # a valid object, stored under another object's key
        doc = json.loads(examples[key])
        doc["metadata"]["name"] = "other"
        value = json.dumps(doc).encode()
    st = state_of(examples)
    before = st.load().model
    st.apply(11, [put(key, value, 11)])
    after = st.load()
    assert not after.errors, after.error_text()
    assert why in st.corrupt[key]
    assert after.model == before   # the previous value of that key stays in force


def test_a_corrupt_new_key_is_skipped_and_reported(examples):
    st = state_of(examples)
    before = st.load().model
    st.apply(11, [put("/hostmesh/config/Service/default/new", b"{", 11)])
    after = st.load()
    assert after.model == before and "/hostmesh/config/Service/default/new" in st.corrupt


def test_a_key_outside_the_layout_is_reported(examples):
    st = state_of(examples)
    st.apply(11, [put("/hostmesh/config/stray", b"x: 1", 11)])
    st.load()
    assert "not a config key" in st.corrupt["/hostmesh/config/stray"]


def test_fixing_a_corrupt_key_clears_it_and_deleting_a_key_removes_its_object(examples):
    key = service_key(examples)
    st = state_of(examples)
    st.apply(11, [put(key, b"{", 11)])
    st.load()
    st.apply(12, [put(key, examples[key], 12)])
    assert not st.load().errors and not st.corrupt
    routes = [k for k in examples if "/HTTPRoute/" in k or "/TrafficPolicy/" in k or "/AuthorizationPolicy/" in k]
    st.apply(13, [delete(k, 13) for k in routes])
    assert "HTTPRoute" not in st.load().model.counts()


def test_a_cross_object_error_rejects_the_change(examples):
    """A route to a Service that is gone: the whole change is refused, as with files."""
    st = state_of(examples)
    services = [k for k in examples if "/Service/" in k]
    st.apply(11, [delete(k, 11) for k in services])
    assert st.load().errors


def test_unchanged_keys_are_not_parsed_again(examples, monkeypatch):
    from controlplane.sources import etcd as mod
    st = state_of(examples)
    st.load()
    calls = []
    real = mod.check_value
    monkeypatch.setattr(mod, "check_value", lambda *a: calls.append(a[1]) or real(*a))
    key = service_key(examples)
    st.apply(11, [put(key, examples[key], 11)])
    st.load()
    assert calls == [key]


def test_apply_plans_only_changes_and_prunes_on_request(examples):
    existing = dict(examples)
    key = service_key(examples)
    existing[key] = b"old"
    existing["/hostmesh/config/Service/default/gone"] = b"x"
    plan = plan_apply(examples, existing, prune=False)
    assert list(plan.puts) == [key] and not plan.deletes and len(plan.unchanged) == len(examples) - 1
    assert plan_apply(examples, existing, prune=True).deletes == ["/hostmesh/config/Service/default/gone"]
    assert not plan_apply(examples, examples, prune=True).puts


def test_apply_values_are_the_documents_as_written(examples):
    key = service_key(examples)
    doc = json.loads(examples[key])
    assert doc["kind"] == "Service"
    result, why = check_value(P, key, examples[key])
    assert why == ""


def test_an_invalid_directory_is_refused_whole(tmp_path):
    (tmp_path / "a.yaml").write_text((EXAMPLES / "services.yaml").read_text())
    (tmp_path / "b.yaml").write_text("apiVersion: hostmesh.io/v1alpha1\nkind: Service\nmetadata: {name: x}\n"
                                     "spec: {ports: [{port: 99999}]}\n")
    with pytest.raises(ConfigInvalid) as exc:
        documents_by_key(str(tmp_path), P)
    assert "b.yaml" in str(exc.value)


def test_etcd_endpoints_parse():
    assert parse_endpoints("http://a:2379, b:2380") == ("a:2379", "b:2380")
    for bad in ("", "a", "a:0", "a:x"):
        with pytest.raises(EtcdError):
            parse_endpoints(bad)


# ---------------------------------------------------------------------- agent side
def test_rotation_moves_on_and_backs_off_only_after_a_full_round():
    r = EndpointRotation("a:1,b:2,c:3")
    assert r.current == "a:1"
    assert r.failed() is False and r.current == "b:2"
    assert r.failed() is False and r.current == "c:3"
    assert r.failed() is True and r.current == "a:1"
    r.failed()
    r.succeeded()
    assert r.failed() is False   # a success starts a new round


def test_rotation_ignores_a_stale_failure_report():
    r = EndpointRotation(["a:1", "b:2"])
    r.failed("a:1")
    assert r.failed("a:1") is False and r.current == "b:2"


def test_one_endpoint_always_backs_off():
    r = EndpointRotation("a:1")
    assert r.failed() is True and r.current == "a:1"


def boot(tmp_path, **over):
    import yaml
    doc = {"node": "n1", "capture": {"mode": "none"}, "controlPlaneAuth": {"insecure": True}, **over}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    return bootstrap.build(bootstrap.load_file(str(path)), {})


@pytest.mark.parametrize("value", ["198.18.0.2:15010,198.18.0.3:15010", ["198.18.0.2:15010", "198.18.0.3:15010"]])
def test_bootstrap_control_plane_takes_a_list(tmp_path, value):
    assert boot(tmp_path, controlPlane=value).control_plane == ("198.18.0.2:15010", "198.18.0.3:15010")


@pytest.mark.parametrize("value, msg", [
    ([], "must be host:port"), (["a:1", "a:1"], "twice"), (["a:1", "b"], "controlPlane[1]"), ("a:99999", "host:port"),
])
def test_bootstrap_control_plane_bad_lists(tmp_path, value, msg):
    with pytest.raises(ConfigError) as exc:
        boot(tmp_path, controlPlane=value)
    assert msg in str(exc.value)


@pytest.mark.parametrize("argv, msg", [
    (["controlplane", "--insecure"], "give one config source"),
    (["controlplane", "--insecure", "--config-dir", "/", "--etcd", "127.0.0.1:2379"], "give one config source"),
    (["controlplane", "--insecure", "--etcd", "127.0.0.1:2379", "--leader-ttl", "1"], "at least 2 seconds"),
    (["controlplane", "--insecure", "--etcd", "127.0.0.1:2379", "--etcd-cert", "c"], "go together"),
    (["config", "apply", "-f", "/nonexistent", "--etcd", "127.0.0.1:1"], "cannot read the directory"),
    (["controlplane", "--insecure", "--config-dir", "/", "--token-review"], "--token-review needs --source kubernetes"),
    (["controlplane", "--source", "kubernetes", "--ca-dir", "/x", "--node-tokens", "/y", "--token-review",
      "--agent-service-account", "nope"], "use NAMESPACE/NAME"),
    (["controlplane", "--config-dir", "/", "--kubeconfig", "/k", "--insecure"], "--kubeconfig goes with"),
])
def test_cli_refuses_bad_source_flags(argv, msg, capsys):
    from hostmesh.cli import main
    assert main(argv) == 1
    assert msg in capsys.readouterr().err
