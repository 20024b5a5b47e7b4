"""Certificate rotation is invisible to traffic: with a 2-minute TTL, ten minutes of steady
cross-node requests through the mTLS tunnel (new connections and one keep-alive
connection) see no failure while both nodes rotate their certificates several times.

The lab runs in tests/soak_rotation.py, started at collection (see tests/conftest.py) so
it overlaps the rest of the suite; this test, collected last, waits for its summary.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import SOAK_SECONDS, require_root, soak_run

pytestmark = [pytest.mark.lab, pytest.mark.timeout(int(SOAK_SECONDS) + 600)]


def test_rotation_under_steady_traffic_fails_no_request(request):
    require_root("the rotation soak")
    run = soak_run(request.config)
    assert run is not None, "the soak process was not started at collection"
    proc = run["proc"]
    proc.wait(timeout=SOAK_SECONDS + 540)
    log = run["out"].with_name("soak.log")
    assert run["out"].exists(), f"no summary; soak log:\n{log.read_text()[-4000:]}"
    summary = json.loads(run["out"].read_text())
    assert proc.returncode == 0 and "error" not in summary, f"{summary}\n{log.read_text()[-4000:]}"
    client = summary["client"]
    assert "error" not in client, client
    assert client["failed"] == 0, client["errors"]
    # steady traffic all along: one new connection per ~50 ms plus the keep-alive requests
    assert client["ok"] >= SOAK_SECONDS * 5, client
    # renewal at 40-50 % of a 120 s lifetime: at least a new certificate every minute
    minimum = int(SOAK_SECONDS // 60)
    assert all(n >= minimum for n in summary["serials"].values()), summary["serials"]
