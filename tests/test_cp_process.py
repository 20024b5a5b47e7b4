"""The control-plane process on loopback: config -> snapshots -> HTTP views; errors keep the last good config."""

import asyncio
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from controlplane.process import ControlPlane

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "config"


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def aget(port, path):
    # the server runs on this event loop: the blocking client must not
    return await asyncio.to_thread(get, port, path)


async def wait_for(pred, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await asyncio.to_thread(pred):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.timeout(60)
def test_views_and_last_good_config(tmp_path):
    cfg = tmp_path / "config"
    shutil.copytree(EXAMPLES, cfg)

    async def scenario():
        cp = ControlPlane(str(cfg), grpc_address="127.0.0.1:0", http_host="127.0.0.1", http_port=0)
        task = asyncio.create_task(cp.run())
        assert await wait_for(lambda: cp.http.bound_port is not None)
        port = cp.http.bound_port
        assert await wait_for(lambda: get(port, "/ready")[0] == 200)
        code, body = (await aget(port, "/debug/config"))
        config = json.loads(body)
        assert code == 200 and config["valid"] and config["objects"]
        nodes = list(config["latest"])
        assert "node1" in nodes
        code, body = (await aget(port, "/debug/snapshot?node=node1"))
        snap = json.loads(body)
        assert code == 200 and any(s["name"] == "web" for s in snap["services"])
        assert (await aget(port, "/debug/snapshot?node=nope"))[0] == 404
        assert (await aget(port, "/debug/agents"))[0] == 200
        before = config["latest"]

        (cfg / "broken.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {ports: 3}\n")
        assert await wait_for(lambda: not json.loads(get(port, "/debug/config")[1])["valid"])
        config = json.loads((await aget(port, "/debug/config"))[1])
        assert config["latest"] == before  # the last good snapshots stay published
        assert any("broken.yaml" in e["message"] for e in config["errors"])
        assert (await aget(port, "/ready"))[0] == 200  # still serving the last good config
        assert "hostmesh_controlplane_config_errors_total 1.0" in (await aget(port, "/metrics"))[1]
        assert (await aget(port, "/debug/config"))[0] == 200 and (await aget(port, "/nope"))[0] == 404

        cp._stop.set()
        assert await task == 0

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_not_ready_without_a_valid_config(tmp_path):
    (tmp_path / "bad.yaml").write_text("kind: Nope\n")

    async def scenario():
        cp = ControlPlane(str(tmp_path), grpc_address="127.0.0.1:0", http_host="127.0.0.1", http_port=0)
        task = asyncio.create_task(cp.run())
        assert await wait_for(lambda: cp.http.bound_port is not None)
        code, body = (await aget(cp.http.bound_port, "/ready"))
        assert code == 503 and "no valid config loaded" in body and "bad.yaml" in body
        cp._stop.set()
        await task

    asyncio.run(scenario())
