"""Shared fixtures: root gating for lab tests and a fresh lab per test module."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI") == "true"
# the console script installed next to the interpreter running the tests (the venv's)
HOSTMESH = str(Path(sys.executable).with_name("hostmesh"))


def require_root(what: str = "this test") -> None:
    """Skip when not root, but fail in CI: a CI run must never silently skip the lab."""
    if os.geteuid() == 0:
        return
    msg = f"{what} needs root (network namespaces, iptables, cgroups)"
    if IN_CI:
        pytest.fail(f"{msg}, and CI=true: CI must run as root")
    pytest.skip(msg)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("lab"):
        require_root(item.nodeid)


def wait_for(pred, timeout: float = 15.0, what: str = "condition") -> None:
    """Poll `pred` until it is true; fail the test naming `what` after `timeout` seconds."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def unique_lab_name() -> str:
    return "t" + secrets.token_hex(4)


@pytest.fixture(scope="module")
def lab():
    """A fresh 2 nodes x 2 pods lab with the test app running in every pod; always removed."""
    require_root("the lab fixture")
    from meshlab.lab import Lab

    the_lab = Lab(unique_lab_name())
    try:
        the_lab.up(2, 2)
        yield the_lab
    finally:
        the_lab.down()


# capture backend, or backend-variant: "ebpf-accel" is eBPF with same-node acceleration on
CAPTURE_BACKENDS = ["iptables", "ebpf", "ebpf-accel"]


@pytest.fixture(scope="module", params=CAPTURE_BACKENDS)
def mesh_lab(request):
    """A 2x2 lab with an agent on every node, once per capture backend; always removed."""
    require_root("the mesh lab fixture")
    from meshlab.lab import Lab

    backend, _, variant = request.param.partition("-")
    the_lab = Lab(unique_lab_name())
    the_lab.capture = backend
    if backend == "ebpf":
        the_lab.accelerate = variant == "accel"  # explicit either way: both variants run whatever the default
    try:
        the_lab.up(2, 2, capture=backend)
        yield the_lab
    finally:
        the_lab.down()


# ---------------------------------------------------------------- the rotation soak
# tests/test_zz_rotation_soak.py checks ten minutes of certificate rotation under traffic.
# Its lab runs in a process started as soon as the test is collected, so those minutes
# overlap the rest of the suite instead of adding to it; the test (collected last) waits
# for the summary. The process removes its lab on SIGTERM, sent if the suite ends first.

SOAK_FILE = "test_zz_rotation_soak.py"
SOAK_SECONDS = float(os.environ.get("HOSTMESH_SOAK_SECONDS", "600"))
_soak_key = pytest.StashKey[dict]()


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: start it only when the test will run
def pytest_collection_modifyitems(session, config, items) -> None:
    if os.geteuid() != 0 or not any(Path(str(item.fspath)).name == SOAK_FILE for item in items):
        return
    import subprocess
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="hostmesh-soak-")) / "summary.json"
    log = open(out.with_name("soak.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tests.soak_rotation", "--out", str(out),
                             "--seconds", str(SOAK_SECONDS)], cwd=Path(__file__).resolve().parent.parent,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    config.stash[_soak_key] = {"proc": proc, "out": out, "log": log}


def soak_run(config) -> dict | None:
    return config.stash.get(_soak_key, None)


def pytest_unconfigure(config) -> None:
    run = config.stash.get(_soak_key, None)
    if run is None:
        return
    proc = run["proc"]
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except Exception:
            proc.kill()
    run["log"].close()
    import shutil
    shutil.rmtree(run["out"].parent, ignore_errors=True)
