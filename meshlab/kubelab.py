"""The lab's Kubernetes mode: the control plane reads a (fake) Kubernetes API instead of the
config directory. meshlab/fakekube.py runs in the control-plane namespace on its loopback
(127.0.0.1:6443), loaded with the lab's objects in Kubernetes form (each Workload as its
Pod, Services as Kubernetes holds them), and `hostmesh controlplane --source kubernetes
--kubeconfig ...` reads it through kubernetes_asyncio. `kube_apply` changes an object
there, as `kubectl apply` would."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from meshlab import mesh
from meshlab.errors import LabError
from meshlab.lab import CONTROLPLANE, Lab

API_PORT = 6443


def kubeconfig_path(lab: Lab) -> Path:
    return Path(lab.names.run_dir, "kube", "kubeconfig")


def start_kube_controlplane(lab: Lab, timeout: float = 20.0) -> None:
    cfg = kubeconfig_path(lab)
    cfg.parent.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p) for p in mesh.cp_config_dir(lab).glob("*.yaml"))
    proc = lab.spawn(lab.target(CONTROLPLANE), [sys.executable, "-m", "meshlab.fakekube", "--port", str(API_PORT),
                                                "--kubeconfig", str(cfg), "--objects", *files], "fakekube")
    deadline = time.monotonic() + timeout
    while not cfg.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"the fake Kubernetes API did not start; see {lab.names.run_dir}/logs/fakekube.log")
        time.sleep(0.05)
    mesh.start_controlplane(lab, source=["--source", "kubernetes", "--kubeconfig", str(cfg)])


def kube_apply(lab: Lab, obj: dict) -> dict:
    token = json.loads(kubeconfig_path(lab).read_text())["users"][0]["user"]["token"]
    r = lab.run(CONTROLPLANE, ["curl", "-sS", "--fail-with-body", "-H", f"Authorization: Bearer {token}",
                               "-H", "Content-Type: application/json", "--data-binary", json.dumps(obj),
                               f"http://127.0.0.1:{API_PORT}/fake/apply"])
    if r.returncode != 0:
        raise LabError(f"applying to the fake Kubernetes API failed: {r.stdout} {r.stderr}")
    return json.loads(r.stdout)
