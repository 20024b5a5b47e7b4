"""`lab down` removes everything a lab made, also after a crash: namespaces, links,
cgroups, processes and the run directory, found by prefix with no state file."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from meshlab import cgroups, system
from meshlab.lab import Lab
from tests.conftest import HOSTMESH, unique_lab_name

pytestmark = pytest.mark.lab


def root_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def lab_processes(lab: Lab) -> list[int]:
    """Any live process that still mentions the lab's run dir or sits in its cgroups.

    Zombies do not count: they are dead, waiting for their parent (here often the test
    process itself, which spawned the apps) to collect them."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cg = (d / "cgroup").read_text()
        except OSError:
            continue
        if lab.names.run_dir in cmd or f"/{lab.names.cgroup_dir}/" in cg:
            found.append(int(d.name))
    return found


def assert_nothing_left(lab: Lab, links_before: str) -> None:
    assert lab.namespaces() == []
    assert not (cgroups.cgroup_root() / lab.names.cgroup_dir).exists()
    assert not Path(lab.names.run_dir).exists()
    assert lab_processes(lab) == []
    assert root_links() == links_before
    assert not lab.exists()


def test_down_removes_everything():
    links = root_links()
    lab = Lab(unique_lab_name())
    try:
        lab.up(2, 2)
        assert lab_processes(lab)  # the test apps
        r = subprocess.run([HOSTMESH, "lab", "down", "--name", lab.name], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert_nothing_left(lab, links)
    finally:
        lab.down()


def test_down_after_processes_were_sigkilled():
    links = root_links()
    lab = Lab(unique_lab_name())
    try:
        lab.up(2, 1)
        pids = lab_processes(lab)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        lab.down()
        assert_nothing_left(lab, links)
    finally:
        lab.down()


def test_down_after_lab_up_itself_was_killed_midway():
    """A crashed `lab up` leaves a partial lab; `lab down` finds it by prefix alone."""
    links = root_links()
    lab = Lab(unique_lab_name())
    proc = subprocess.Popen([HOSTMESH, "lab", "up", "--name", lab.name, "--nodes", "3", "--pods-per-node", "3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while len(lab.namespaces()) < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.kill()
        proc.wait()
        assert lab.exists()
        r = subprocess.run([HOSTMESH, "lab", "down", "--name", lab.name], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert_nothing_left(lab, links)
    finally:
        proc.kill()
        lab.down()


def test_down_of_a_missing_lab_is_a_no_op():
    lab = Lab(unique_lab_name())
    assert lab.down() == {"namespaces": [], "processes": [], "cgroups": [str(cgroups.cgroup_root() / lab.names.cgroup_dir)]}


def test_netns_pids_finds_processes_by_namespace():
    lab = Lab(unique_lab_name())
    try:
        lab.up(1, 1, apps=False)
        target = lab.target("node1/pod-1")
        p = lab.spawn(target, ["sleep", "60"], "sleeper")
        deadline = time.monotonic() + 10
        while p.pid not in system.netns_pids(target.namespace) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert p.pid in system.netns_pids(target.namespace)
        lab.down()
        assert p.wait(timeout=10) is not None
    finally:
        lab.down()


def test_down_removes_bpf_pins_of_sigkilled_agents():
    from meshlab import mesh
    from meshlab.lab import bpf_pins
    lab = Lab(unique_lab_name())
    try:
        lab.up(1, 1, capture="ebpf")
        assert bpf_pins(lab.name)
        for pid in mesh.agent_pids(lab, "node1"):
            os.kill(pid, signal.SIGKILL)
        lab.down()
        assert bpf_pins(lab.name) == []
        assert not lab.exists()
    finally:
        lab.down()
