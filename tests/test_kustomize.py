"""tests/kustomize.py, the renderer the daemonset/ tests use instead of a kustomize binary:
the JSON 6902 ops, and a refusal (never a silent skip) for everything outside its subset."""

from __future__ import annotations

import pytest
import yaml

from tests.kustomize import KustomizeError, json_patch, render

pytestmark = pytest.mark.timeout(30)

DOC = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "a", "namespace": "ns"},
       "spec": {"list": [1, 2], "map": {"k": "v", "a/b": 1}}}


def test_json_patch_ops():
    out = json_patch(DOC, [
        {"op": "test", "path": "/spec/list/0", "value": 1},
        {"op": "add", "path": "/spec/list/-", "value": 3},
        {"op": "add", "path": "/spec/list/0", "value": 0},
        {"op": "replace", "path": "/spec/map/k", "value": "w"},
        {"op": "remove", "path": "/spec/map/a~1b"},
        {"op": "add", "path": "/spec/new", "value": {"x": 1}},
    ])
    assert out["spec"] == {"list": [0, 1, 2, 3], "map": {"k": "w"}, "new": {"x": 1}}
    assert DOC["spec"]["list"] == [1, 2]   # a copy


@pytest.mark.parametrize("op,message", [
    ({"op": "test", "path": "/spec/list/0", "value": 9}, "test failed"),
    ({"op": "test", "path": "/spec/absent", "value": 1}, "test failed"),
    ({"op": "replace", "path": "/spec/absent", "value": 1}, "does not exist"),
    ({"op": "remove", "path": "/spec/list/5"}, "out of range"),
    ({"op": "add", "path": "/spec/nope/x", "value": 1}, "does not exist"),
    ({"op": "move", "from": "/spec/list", "path": "/spec/x"}, "not supported"),
    ({"op": "replace", "path": "spec", "value": 1}, "not a JSON pointer"),
])
def test_json_patch_errors(op, message):
    with pytest.raises(KustomizeError, match=message):
        json_patch(DOC, [op])


def _write(tmp_path, kustomization: dict, files: dict[str, object]):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    for name, docs in files.items():
        (tmp_path / name).write_text(docs if isinstance(docs, str) else yaml.safe_dump_all(docs))
    return tmp_path


def test_resources_directories_and_patches(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    _write(base, {"resources": ["a.yaml"]}, {"a.yaml": [DOC, {**DOC, "kind": "Deployment"}]})
    over = tmp_path / "over"
    over.mkdir()
    _write(over, {"resources": ["../base", "b.yaml"],
                  "patches": [{"target": {"kind": "DaemonSet", "name": "a"}, "path": "p.yaml"}]},
           {"b.yaml": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}],
            "p.yaml": yaml.safe_dump([{"op": "replace", "path": "/spec/list", "value": []}])})
    objs = render(over)
    assert [o["kind"] for o in objs] == ["DaemonSet", "Deployment", "ConfigMap"]
    assert objs[0]["spec"]["list"] == [] and objs[1]["spec"]["list"] == [1, 2]


@pytest.mark.parametrize("kustomization,message", [
    ({"resources": ["a.yaml"], "namespace": "x"}, "namespace not supported"),
    ({"resources": ["a.yaml"], "patches": [{"target": {"kind": "Nope"}, "patch": "[]"}]}, "matches no resource"),
    ({"resources": ["a.yaml"], "patches": [{"target": {"kind": "DaemonSet"}, "patch": "spec: {}"}]},
     "not strategic-merge"),
    ({"resources": ["a.yaml"], "patches": [{"patch": "[]"}]}, "needs a target"),
    ({"resources": ["a.yaml"], "patches": [{"target": {"labelSelector": "a=b"}, "patch": "[]"}]}, "needs a target"),
    ({"resources": ["a.yaml", "a.yaml"]}, "two resources with the id"),
    ({"resources": ["https://example.com/x.yaml"]}, "remote resource"),
])
def test_what_is_outside_the_subset_is_refused(tmp_path, kustomization, message):
    _write(tmp_path, kustomization, {"a.yaml": [DOC]})
    with pytest.raises(KustomizeError, match=message):
        render(tmp_path)
