"""The Containerfile, checked without a container engine: every path it COPYs from the
repository exists, the wheel its build stage makes builds from the repository alone and
carries the eBPF programs, and an installed copy's loader finds them (no repository, no
HOSTMESH_BPF_DIR)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
CONTAINERFILE = REPO / "Containerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_every_copied_path_exists_in_the_repository():
    copies = [args for word, args in instructions() if word == "COPY" and not args.startswith("--from=")]
    assert copies
    for args in copies:
        *sources, _dest = args.split()
        for src in sources:
            assert (REPO / src).exists(), f"Containerfile: COPY {src}: no such path in the repository"


def test_the_image_is_debian_12_with_bcc_and_the_capture_tools():
    froms = [args for word, args in instructions() if word == "FROM"]
    assert froms and all(f.split()[0].startswith("debian:12") for f in froms)
    apt = " ".join(args for word, args in instructions() if word == "RUN" and "apt-get install" in args)
    for pkg in ("python3-bpfcc", "bpfcc-tools", "iproute2", "iptables", "curl"):
        assert f" {pkg}" in apt, pkg
    # what the manifests run: the entrypoint and the CLI
    runs = " ".join(args for word, args in instructions() if word in ("RUN", "COPY", "ENTRYPOINT"))
    assert "/usr/local/bin/agent-entrypoint" in runs and "/usr/local/bin/hostmesh" in runs
    shebang = (REPO / "daemonset/image/agent-entrypoint.py").read_text().splitlines()[0]
    assert shebang == "#!/opt/hostmesh/bin/python3" and "venv --system-site-packages /opt/hostmesh" in runs


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The build stage's `pip wheel --no-deps .`, from a copy of just what it COPYs."""
    src = tmp_path_factory.mktemp("src")
    for word, args in instructions():
        if word == "COPY" and not args.startswith("--from="):
            *sources, _ = args.split()
            for s in sources:
                if s.startswith("daemonset/"):
                    continue   # the run stage's
                path = REPO / s
                if path.is_dir():
                    shutil.copytree(path, src / s, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy(path, src / s)
    out = tmp_path_factory.mktemp("wheels")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(src)], capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("hostmesh-*.whl")
    return whl


def test_the_wheel_carries_the_bpf_programs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"bpf/{p.name}" for p in (REPO / "bpf").glob("*.c")} | \
           {f"bpf/lib/{p.name}" for p in (REPO / "bpf/lib").glob("*.h")}
    assert len(want) >= 10 and want <= names, want - names
    assert "hostmesh/systemd/hostmesh-agent.service" in names
    assert any(n.startswith("controlplane/api/") and n.endswith(".proto") for n in names)


def test_an_installed_copy_finds_its_bpf_programs(wheel, tmp_path):
    """Unpacked (what pip install does), outside the repository: the loader's BPF_DIR and
    the build id both see the programs the wheel carries."""
    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    env = {k: v for k, v in os.environ.items() if k not in ("HOSTMESH_BPF_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    code = ("import nodeagent.capture.ebpf_loader as l, nodeagent.lineage as g, json;"
            "print(json.dumps([str(l.BPF_DIR), l.__file__, g.build_id()]))")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    import json
    bpf_dir, loader_file, build = json.loads(r.stdout)
    assert loader_file.startswith(str(site)), "imported the repository's copy, not the installed one"
    assert Path(bpf_dir) == site / "bpf"
    assert (Path(bpf_dir) / "connect4.c").is_file() and (Path(bpf_dir) / "lib" / "maps.h").is_file()
    # the build id hashes the programs too: a changed program is a changed build
    (site / "bpf" / "connect4.c").write_text("/* changed */\n")
    r2 = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                        timeout=60)
    assert json.loads(r2.stdout)[2] != build
