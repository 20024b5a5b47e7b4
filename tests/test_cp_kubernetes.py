"""The Kubernetes source against the in-repo fake API server (meshlab/fakekube.py), driven
by the real client library (kubernetes_asyncio): the examples served from Kubernetes objects
make the same model as from files; changes arrive within a second; bookmarks, a watch that
drops mid-stream, 410 Gone and an unreachable API server are survived; bad objects are
skipped with a Warning Event and the rest is served."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import yaml

from controlplane.model.kinds import HOSTMESH_API, KINDS
from controlplane.sources import load_directory
from controlplane.sources.kubernetes import KubeSettings, KubernetesSource, KubeState, service_document, \
    workload_document
from meshlab.fakekube import FakeKube, from_mesh_document
from tests.sourcetools import Recorder, until

pytestmark = pytest.mark.timeout(60)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "config"
HOSTMESH_KINDS = [k for k, s in KINDS.items() if s.api_version == HOSTMESH_API]


def example_objects() -> list[dict]:
    docs = []
    for f in sorted(EXAMPLES.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return [from_mesh_document(d) for d in docs]


@pytest.fixture
def kube(tmp_path):
    fake = FakeKube(hostmesh_kinds=HOSTMESH_KINDS, bookmark_interval=0.3).start()
    for obj in example_objects():
        fake.apply(obj)
    fake.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(fake.kubeconfig())
    fake.config_path = str(cfg)
    yield fake
    fake.stop()


def run_source(kube, scenario):
    async def main():
        rec = Recorder()
        src = KubernetesSource(KubeSettings(kube.config_path), rec.on_change, rec.on_error)
        task = asyncio.create_task(src.run())
        try:
            await scenario(src, rec)
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
    asyncio.run(main())


def web_ports(model) -> set[int]:
    return {p["port"] for o in model.objects if o.kind == "Service" and o.name == "web" for p in o.spec_view["ports"]}


def test_the_examples_from_kubernetes_make_the_same_model_as_from_files(kube):
    files = load_directory(str(EXAMPLES)).model

    async def scenario(src, rec):
        assert await until(lambda: src.model is not None)
        assert src.model.counts() == files.counts()
        assert src.model.version == files.version
        assert len(rec.models) == 1          # not reported before every resource had listed
    run_source(kube, scenario)


def test_a_change_reaches_the_model_within_a_second_and_bookmarks_advance(kube):
    async def scenario(src, rec):
        assert await until(lambda: src.model is not None)
        svc = json.loads(json.dumps(kube.objects["/api/v1/services"][("default", "web")]))
        svc["spec"]["ports"].append({"name": "extra", "port": 8088, "targetPort": 8080, "protocol": "TCP"})
        t0 = time.monotonic()
        kube.apply(svc)
        assert await until(lambda: 8088 in web_ports(src.model), 2)
        assert time.monotonic() - t0 < 1.0
        # with no events, bookmarks move every resource's version to the server's
        before = dict(src.describe()["resource_versions"])
        kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
        assert await until(lambda: all(int(v) >= kube.rv for v in src.describe()["resource_versions"].values()), 3), \
            (kube.rv, src.describe()["resource_versions"], kube.watches()[-3:])
        assert before != src.describe()["resource_versions"]
    run_source(kube, scenario)


def test_a_dropped_watch_resumes_from_the_last_version_without_listing_again(kube):
    async def scenario(src, rec):
        assert await until(lambda: src.model is not None)
        lists = src.lists
        kube.drop_watches()
        pod = json.loads(json.dumps(next(iter(kube.objects["/api/v1/pods"].values()))))
        pod["metadata"]["labels"]["after"] = "drop"
        kube.apply(pod)     # while no watch is open: delivered by the resumed one
        assert await until(lambda: any(dict(o.labels).get("after") == "drop" for o in src.model.objects), 5)
        assert src.lists == lists            # resumed by resourceVersion, not relisted
        resumed = [q for q in kube.watches() if "pods" in q][-1]
        assert "resourceVersion=" in resumed
    run_source(kube, scenario)


def test_410_gone_makes_it_list_again(kube):
    async def scenario(src, rec):
        assert await until(lambda: src.model is not None)
        lists = src.lists
        kube.compact()
        kube.drop_watches()     # the next watch asks for a compacted version: 410
        assert await until(lambda: src.lists >= lists + len(src.resources), 5)
        pod = json.loads(json.dumps(next(iter(kube.objects["/api/v1/pods"].values()))))
        pod["metadata"]["labels"]["extra"] = "yes"
        kube.apply(pod)
        assert await until(lambda: any(dict(o.labels).get("extra") == "yes" for o in src.model.objects), 3)
    run_source(kube, scenario)


def test_a_bad_object_is_skipped_with_an_event_and_the_rest_served(kube):
    async def scenario(src, rec):
        assert await until(lambda: src.model is not None)
        good = src.model
        tp = json.loads(json.dumps(next(iter(kube.objects["/apis/hostmesh.io/v1alpha1/trafficpolicies"].values()))))
        tp["spec"]["loadBalancer"] = {"simple": "NOPE"}
        kube.apply(tp)
        kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pending", "namespace": "default"},
                    "spec": {"containers": []}, "status": {"phase": "Pending"}})
        kube.apply({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "ghost-abc", "namespace": "default",
                                 "labels": {"kubernetes.io/service-name": "ghost"}}})
        assert await until(lambda: kube.events, 3)
        ev = kube.events[0]
        assert ev["type"] == "Warning" and ev["reason"] == "InvalidMeshObject"
        assert ev["involvedObject"]["kind"] == "TrafficPolicy" and "spec.loadBalancer.simple" in ev["message"]
        assert src.model == good and not src.errors            # the last valid version stays
        d = src.describe()
        assert any("TrafficPolicy" in r["object"] for r in d["rejected"])
        assert {"object": "Pod default/pending", "reason": "no pod IP or node yet"} in d["skipped"]
        assert d["orphan_endpointslices"] == ["default/ghost-abc (Service default/ghost)"]
        await asyncio.sleep(0.3)
        assert len(kube.events) == 1                          # once, not on every rebuild
    run_source(kube, scenario)


def test_an_unreachable_api_server_is_retried_and_the_last_good_config_kept(kube):
    async def scenario(src, rec):
        assert await until(lambda: src.model is not None)
        good = src.model
        kube.stop()
        assert await until(lambda: src.last_error, 5)
        assert src.model == good
        kube.start()                                          # the same port again
        svc = json.loads(json.dumps(kube.objects["/api/v1/services"][("default", "web-canary")]))
        svc["metadata"]["labels"] = {"touched": "1"}
        kube.apply(svc)
        assert await until(lambda: any(dict(o.labels).get("touched") == "1" for o in src.model.objects), 15)
    run_source(kube, scenario)


def test_bad_tokens_are_errors_not_models(kube, tmp_path):
    cfg = json.loads(kube.kubeconfig())
    cfg["users"][0]["user"]["token"] = "wrong"
    bad = tmp_path / "bad-kubeconfig"
    bad.write_text(json.dumps(cfg))
    kube.config_path = str(bad)

    async def scenario(src, rec):
        assert await until(lambda: "401" in src.last_error, 5)
        assert src.model is None
    run_source(kube, scenario)


# ---------------------------------------------------------------------- translation (no I/O)
def test_translation_of_services_and_pods():
    doc, why = service_document({"metadata": {"name": "db", "namespace": "a"},
                                 "spec": {"type": "NodePort", "clusterIP": "10.0.0.5", "selector": {"app": "db"},
                                          "ports": [{"port": 5432, "protocol": "TCP", "nodePort": 30000},
                                                    {"port": 53, "protocol": "UDP"}]}})
    assert why == "" and doc["spec"] == {"clusterIP": "10.0.0.5", "selector": {"app": "db"}, "ports": [{"port": 5432}]}
    assert service_document({"metadata": {"name": "x"}, "spec": {"clusterIP": "None", "ports": [{"port": 1}]}})[1] \
        == "headless Services (clusterIP: None) are not meshed"
    assert service_document({"metadata": {"name": "x"}, "spec": {"type": "ExternalName"}})[0] is None
    assert workload_document({"metadata": {"name": "p"}, "spec": {"hostNetwork": True}})[0] is None
    assert workload_document({"metadata": {"name": "p"}, "spec": {"nodeName": "n"},
                              "status": {"phase": "Succeeded", "podIP": "10.1.0.1"}})[1] == "succeeded"


def test_nothing_is_reported_before_every_resource_listed():
    st = KubeState(["Service", "Pod"])
    st.reset("Service", [], "5")
    assert not st.synced
    st.reset("Pod", [], "5")
    assert st.synced


def test_resources_the_cluster_does_not_serve_count_as_empty(tmp_path):
    """No hostmesh.io CRDs installed (404 on their lists): Services and Pods are served anyway."""
    fake = FakeKube().start()
    try:
        for doc in [d for d in yaml.safe_load_all((EXAMPLES / "workloads.yaml").read_text()) if d]:
            fake.apply(from_mesh_document(doc))
        cfg = tmp_path / "kubeconfig"
        cfg.write_text(fake.kubeconfig())
        fake.config_path = str(cfg)

        async def scenario(src, rec):
            assert await until(lambda: src.model is not None, 5)
            assert src.model.counts() == {"Workload": 4}
        run_source(fake, scenario)
    finally:
        fake.stop()
