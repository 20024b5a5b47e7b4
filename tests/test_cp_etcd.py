"""The etcd source, `config apply` and leader election against a real etcd (Debian's
etcd-server, started here on 127.0.0.1 with free ports, one per test; never mocked)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controlplane.apply import apply_directory, documents_by_key
from controlplane.election import LeaderElection, leader_key
from controlplane.etcd import EtcdClient, EtcdError, put_op
from controlplane.process import ControlPlane, Etcd
from controlplane.sources.etcd import EtcdSource, config_prefix
from meshlab.etcdserver import ETCD, EtcdServer, free_port
from tests.conftest import HOSTMESH, IN_CI
from tests.sourcetools import Recorder, until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "config"
P = "/hostmesh/"

if not os.path.exists(ETCD):
    if IN_CI:
        raise RuntimeError("etcd is not installed, and CI=true: ./quickstart installs etcd-server")
    pytest.skip("etcd is not installed (Debian package etcd-server)", allow_module_level=True)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def etcd(tmp_path):
    with EtcdServer(tmp_path / "etcd") as server:
        yield server


def client(server) -> EtcdClient:
    return EtcdClient([server.endpoint], timeout=2.0)


def mutated_examples(tmp_path: Path, port: int) -> Path:
    """The examples with one more port on the `web-canary` Service: one key differs."""
    d = tmp_path / f"changed-{port}"
    shutil.copytree(EXAMPLES, d)
    text = (d / "services.yaml").read_text()
    last = "    targetPort: 8080\n    appProtocol: http\n"
    assert text.endswith(last)
    (d / "services.yaml").write_text(text + f"  - name: extra\n    port: {port}\n    targetPort: 8080\n")
    return d


def service_ports(model) -> set[int]:
    return {p["port"] for o in model.objects if o.kind == "Service" for p in o.spec_view["ports"]}


# ---------------------------------------------------------------------- the source
def test_applied_objects_reach_the_source_within_a_second(etcd, tmp_path):
    async def scenario():
        c = client(etcd)
        rec = Recorder()
        src = EtcdSource(c, rec.on_change, rec.on_error, prefix=P)
        await src.initial_load()
        assert src.model.objects == () and not src.errors   # an empty prefix: an empty mesh, no error
        task = asyncio.create_task(src.run())
        try:
            t0 = time.monotonic()
            plan = await apply_directory(c, str(EXAMPLES), prefix=P)
            assert len(plan.puts) == len(documents_by_key(str(EXAMPLES), P))
            assert await until(lambda: src.model.objects, 2)
            assert rec.models[-1][0] - t0 < 1.0
            assert len(rec.models) == 2      # the empty start, then one transaction: one rebuild
            t1 = time.monotonic()
            await apply_directory(c, str(mutated_examples(tmp_path, 8081)), prefix=P)
            assert await until(lambda: 8081 in service_ports(src.model), 2)
            assert time.monotonic() - t1 < 1.0
        finally:
            task.cancel()
            await c.close()
    asyncio.run(scenario())


def test_a_corrupt_value_is_logged_skipped_and_the_rest_served(etcd, caplog):
    async def scenario():
        c = client(etcd)
        await apply_directory(c, str(EXAMPLES), prefix=P)
        rec = Recorder()
        src = EtcdSource(c, rec.on_change, rec.on_error, prefix=P)
        await src.initial_load()
        good = src.model
        task = asyncio.create_task(src.run())
        try:
            key = f"{config_prefix(P)}Service/default/web"
            await c.put(key, b"spec: [")
            await c.put(f"{config_prefix(P)}Service/default/extra", b"not: an object")
            assert await until(lambda: len(src.state.corrupt) == 2, 2)
            assert src.model == good and not src.errors
            skipped = {s["key"] for s in src.describe()["skipped"]}
            assert key in skipped
        finally:
            task.cancel()
            await c.close()
    asyncio.run(scenario())
    assert any("corrupt value in etcd skipped" in r.message and getattr(r, "key", "").endswith("web")
               for r in caplog.records)


def test_compaction_makes_the_source_list_again(etcd, tmp_path):
    async def scenario():
        c = client(etcd)
        await apply_directory(c, str(EXAMPLES), prefix=P)
        src = EtcdSource(c, lambda m: None, lambda e: None, prefix=P)
        await src.initial_load()
        listed_at = src.state.revision
        # history moves on and is compacted while this source is not watching
        await apply_directory(c, str(mutated_examples(tmp_path, 8082)), prefix=P)
        rev = await c.put("/unrelated", b"x")
        await c.compact(rev)
        assert src.state.revision == listed_at
        task = asyncio.create_task(src.run())
        try:
            assert await until(lambda: src.relists == 2 and 8082 in service_ports(src.model), 5)
        finally:
            task.cancel()
            await c.close()
    asyncio.run(scenario())


def test_an_etcd_restart_is_survived_on_the_last_good_config(etcd, tmp_path):
    async def scenario():
        c = client(etcd)
        await apply_directory(c, str(EXAMPLES), prefix=P)
        src = EtcdSource(c, lambda m: None, lambda e: None, prefix=P)
        await src.initial_load()
        good = src.model
        task = asyncio.create_task(src.run())
        try:
            await asyncio.to_thread(etcd.stop)
            assert await until(lambda: not src.connected, 10)
            assert src.model == good and "etcd" in src.last_error
            await asyncio.to_thread(etcd.start)
            assert await until(lambda: src.connected, 15)
            await apply_directory(c, str(mutated_examples(tmp_path, 8083)), prefix=P)
            assert await until(lambda: 8083 in service_ports(src.model), 2)
        finally:
            task.cancel()
            await c.close()
    asyncio.run(scenario())


def test_unreachable_at_start_says_why_and_retries(tmp_path):
    server = EtcdServer(tmp_path / "etcd")

    async def scenario():
        c = EtcdClient([server.endpoint], timeout=1.0)
        cp = ControlPlane(None, grpc_address="127.0.0.1:0", http_host="127.0.0.1", http_port=0,
                          etcd=Etcd(endpoints=[server.endpoint], prefix=P, replica="only"))
        task = asyncio.create_task(cp.run())
        try:
            assert await until(lambda: cp.http.bound_port is not None, 10)
            view = cp.config_view()
            assert view["source"]["connected"] is False
            assert f"etcd unreachable at {server.endpoint}" in view["source"]["last_error"]
            ready = cp._ready("")
            assert ready.status == 503 and "etcd unreachable" in ready.body.decode()
            await asyncio.to_thread(server.start)
            await apply_directory(c, str(EXAMPLES), prefix=P)
            assert await until(lambda: cp.model is not None, 15)
            assert cp._ready("").status == 200
            assert await until(lambda: cp.election.leading, 10)
        finally:
            cp._stop.set()
            await asyncio.wait_for(task, 10)
            await c.close()
    try:
        asyncio.run(scenario())
    finally:
        server.remove()


# ---------------------------------------------------------------------- config apply
def run_cli(*argv):
    return subprocess.run([HOSTMESH, *argv], capture_output=True, text=True, timeout=60)


def test_config_apply_refuses_invalid_input_and_writes_nothing(etcd, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(EXAMPLES, bad)
    (bad / "zz.yaml").write_text("apiVersion: hostmesh.io/v1alpha1\nkind: HTTPRoute\nmetadata: {name: r}\n"
                                 "spec: {parentRefs: [{name: nowhere}], rules: [{backendRefs: [{name: nowhere}]}]}\n")
    r = run_cli("config", "apply", "-f", str(bad), "--etcd", etcd.endpoint)
    assert r.returncode == 1 and "nothing was written" in r.stderr and "zz.yaml" in r.stderr

    async def keys():
        c = client(etcd)
        try:
            return (await c.get_prefix(P))[1]
        finally:
            await c.close()
    assert asyncio.run(keys()) == []


def test_config_apply_is_idempotent_and_prunes(etcd, tmp_path):
    r = run_cli("config", "apply", "-f", str(EXAMPLES), "--etcd", etcd.endpoint)
    assert r.returncode == 0, r.stderr
    r = run_cli("config", "apply", "-f", str(EXAMPLES), "--etcd", etcd.endpoint, "-o", "json")
    out = json.loads(r.stdout)
    assert out["written"] == [] and len(out["unchanged"]) == len(documents_by_key(str(EXAMPLES), P))
    fewer = tmp_path / "fewer"
    shutil.copytree(EXAMPLES, fewer)
    (fewer / "policies.yaml").unlink()
    assert not documents_by_key(str(fewer), P).keys() - documents_by_key(str(EXAMPLES), P).keys()
    r = run_cli("config", "apply", "-f", str(fewer), "--etcd", etcd.endpoint, "--prune", "--dry-run", "-o", "json")
    planned = json.loads(r.stdout)["deleted"]
    assert planned
    r = run_cli("config", "apply", "-f", str(fewer), "--etcd", etcd.endpoint, "--prune", "-o", "json")
    assert json.loads(r.stdout)["deleted"] == planned
    r = run_cli("config", "apply", "-f", str(fewer), "--etcd", etcd.endpoint, "--prune", "-o", "json")
    assert json.loads(r.stdout)["deleted"] == [] and json.loads(r.stdout)["written"] == []


def test_config_apply_with_etcd_down_is_a_clear_error(tmp_path):
    r = run_cli("config", "apply", "-f", str(EXAMPLES), "--etcd", f"127.0.0.1:{free_port()}")
    assert r.returncode == 1 and "etcd unreachable at 127.0.0.1:" in r.stderr


# ---------------------------------------------------------------------- election
def election(server, name, ttl=2, **kw) -> LeaderElection:
    return LeaderElection(client(server), name, prefix=P, ttl=ttl, **kw)


def test_one_leader_and_a_killed_leader_is_replaced_within_the_ttl(etcd):
    async def scenario():
        a, b = election(etcd, "a"), election(etcd, "b")
        ta = asyncio.create_task(a.run())
        assert await until(lambda: a.leading, 5)
        tb = asyncio.create_task(b.run())
        await asyncio.sleep(0.5)
        assert not b.leading and b.leader == "a"
        ta.cancel()                      # "SIGKILL": no resign, the lease must expire
        t0 = time.monotonic()
        assert await until(lambda: b.leading, a.ttl + 2)
        assert time.monotonic() - t0 <= a.ttl + 1.0
        b_took = time.monotonic()
        await b.resign()                 # a clean stop hands over at once
        tb.cancel()
        c = election(etcd, "c")
        tc = asyncio.create_task(c.run())
        assert await until(lambda: c.leading, 1.5)
        assert time.monotonic() - b_took < 1.5
        tc.cancel()
    asyncio.run(scenario())


def test_a_deposed_leader_that_has_not_noticed_cannot_write(etcd):
    """Split brain by construction: A is paused past its lease (still believes it leads), B
    is elected; A's fenced write is refused by etcd and A steps down."""
    async def scenario():
        a, b = election(etcd, "a"), election(etcd, "b")
        ta = asyncio.create_task(a.run())
        assert await until(lambda: a.leading, 5)
        ta.cancel()                      # A stops refreshing, but its state still says leader
        await asyncio.sleep(0)
        assert a.leading
        tb = asyncio.create_task(b.run())
        assert await until(lambda: b.leading, a.ttl + 3)
        assert a.leading                 # both think they lead...
        assert not await a.fenced_txn([put_op("/hostmesh/status/config", b"from a")])
        assert not a.leading             # ...until A tries to act on it
        assert await b.fenced_txn([put_op("/hostmesh/status/config", b"from b")])
        kv = await b.client.get("/hostmesh/status/config")
        assert kv.value == b"from b"
        tb.cancel()
    asyncio.run(scenario())


def test_every_fenced_write_was_made_by_the_leader_of_its_revision(etcd):
    """Four replicas campaign while leaders are killed at random; etcd's own history then
    shows each successful leader write was made while its writer held the leader key."""
    import random

    async def scenario():
        rnd = random.Random(7)
        names = ["r0", "r1", "r2", "r3"]
        elections = {n: election(etcd, n) for n in names}
        tasks = {n: asyncio.create_task(e.run()) for n, e in elections.items()}
        writes: list[tuple[str, int]] = []

        async def writer(name):
            e = elections[name]
            while True:
                await asyncio.sleep(0.05)
                if e.leading:
                    try:
                        resp = await e.client.txn(
                            [*_fence(e)], [put_op("/hostmesh/status/config", name.encode())])
                    except EtcdError:   # a slow etcd under load: the next round tries again
                        continue
                    if resp.succeeded:
                        writes.append((name, resp.header.revision))
        writers = [asyncio.create_task(writer(n)) for n in names]
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            await asyncio.sleep(rnd.uniform(1.0, 2.5))
            leader = next((n for n, e in elections.items() if e.leading), None)
            if leader is not None:
                tasks[leader].cancel()           # kill without resigning
                elections[leader] = election(etcd, leader)   # and "restart" the replica
                tasks[leader] = asyncio.create_task(elections[leader].run())
        for t in [*tasks.values(), *writers]:
            t.cancel()
        c = client(etcd)
        leaders = set()
        for name, rev in writes:
            kv = await c.get(leader_key(P), revision=rev)
            assert kv is not None and kv.value.decode() == name, (name, rev)
            leaders.add(name)
        await c.close()
        assert len(writes) > 20 and len(leaders) >= 2, (len(writes), leaders,
                                                         {n: e.describe() for n, e in elections.items()})
    asyncio.run(scenario())


def _fence(e: LeaderElection):
    from controlplane.etcd import create_revision_is, value_is
    return [create_revision_is(e.key, e._create_revision), value_is(e.key, e.identity.encode())]


# ---------------------------------------------------------------------- the process
def test_two_replicas_share_etcd_and_only_the_leader_writes_status(etcd, tmp_path):
    async def scenario():
        cps = [ControlPlane(None, grpc_address="127.0.0.1:0", http_host="127.0.0.1", http_port=0,
                            etcd=Etcd(endpoints=[etcd.endpoint], prefix=P, replica=f"cp{i}", lease_ttl=2))
               for i in range(2)]
        c = client(etcd)
        await apply_directory(c, str(EXAMPLES), prefix=P)
        tasks = [asyncio.create_task(cp.run()) for cp in cps]
        try:
            assert await until(lambda: all(cp.model is not None for cp in cps), 10)
            assert cps[0].model.version == cps[1].model.version
            assert await until(lambda: sum(cp.election.leading for cp in cps) == 1, 10)
            leader = next(cp for cp in cps if cp.election.leading)
            assert await until(lambda: leader.status_written is not None, 5)
            record = json.loads((await c.get("/hostmesh/status/config")).value)
            assert record["leader"] == leader.election.identity and record["valid"]
            assert record["model_version"] == leader.model.version
            follower = next(cp for cp in cps if cp is not leader)
            leader._stop.set()           # a clean stop resigns: the follower leads at once
            assert await until(lambda: follower.election.leading, 3)
            await apply_directory(c, str(mutated_examples(tmp_path, 8084)), prefix=P)
            assert await until(lambda: 8084 in service_ports(follower.model), 2)
            assert await until(lambda: follower.status_written is not None
                               and follower.model.version in follower.status_written, 5)
        finally:
            for cp in cps:
                cp._stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 15)
            await c.close()
    asyncio.run(scenario())


# ---------------------------------------------------------------------- TLS
def _openssl_pki(d: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made by openssl."""
    def run(*argv):
        subprocess.run(["openssl", *argv], check=True, capture_output=True, cwd=d)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
        "-subj", "/CN=etcd test CA", "-keyout", "ca.key", "-out", "ca.pem")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return {k: str(d / v) for k, v in (("ca", "ca.pem"), ("server", "server.pem"), ("server_key", "server.key"),
                                         ("client", "client.pem"), ("client_key", "client.key"))}


def test_etcd_over_mutual_tls(tmp_path):
    from controlplane.etcd import EtcdTLS
    pki = tmp_path / "pki"
    pki.mkdir()
    f = _openssl_pki(pki)
    client_tls = EtcdTLS(f["ca"], f["client"], f["client_key"])
    server = EtcdServer(tmp_path / "etcd", tls=EtcdTLS(f["ca"], f["server"], f["server_key"]))
    server.start(client_tls=client_tls)
    try:
        args = ["--etcd", server.endpoint, "--etcd-cacert", f["ca"], "--etcd-cert", f["client"],
                "--etcd-key", f["client_key"]]
        r = run_cli("config", "apply", "-f", str(EXAMPLES), *args)
        assert r.returncode == 0, r.stderr
        # without a client certificate etcd refuses the handshake: a clear error, nothing written
        r = run_cli("config", "apply", "-f", str(EXAMPLES), "--etcd", server.endpoint, "--etcd-cacert", f["ca"])
        assert r.returncode == 1 and "etcd" in r.stderr

        async def read():
            c = EtcdClient([server.endpoint], tls=client_tls)
            try:
                return len((await c.get_prefix(P))[1])
            finally:
                await c.close()
        assert asyncio.run(read()) == len(documents_by_key(str(EXAMPLES), P))
    finally:
        server.remove()
