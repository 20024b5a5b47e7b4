"""`hostmesh demo` runs end to end and leaves nothing behind."""

import subprocess

import pytest

from meshlab.lab import Lab
from tests.conftest import HOSTMESH, unique_lab_name

pytestmark = pytest.mark.lab


def test_demo_runs_and_cleans_up():
    name = unique_lab_name()
    try:
        r = subprocess.run([HOSTMESH, "demo", "--name", name], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "health SERVING" in r.stdout
        assert "pod traffic is captured transparently" in r.stdout
        assert "mutual_tls from spiffe://cluster.local/ns/default/sa/testapp" in r.stdout
        assert "traffic goes only to: node2/pod-1, node2/pod-2" in r.stdout
        assert f"lab {name!r} removed" in r.stdout
        assert not Lab(name).exists()
    finally:
        Lab(name).down()
