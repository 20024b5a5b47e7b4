"""The file source: directory loading, change detection, debounce, last-good-model semantics."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest

from controlplane.model import MeshModel
from controlplane.sources import FileSource, load_directory
from controlplane.sources import files as files_mod

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "config"

WORKLOAD = """\
apiVersion: hostmesh.io/v1alpha1
kind: Workload
metadata: {{name: {name}, labels: {{app: web, track: stable}}}}
spec: {{node: node3, address: {address}, ports: [{{name: http, port: 8080}}, {{name: grpc, port: 9090}}]}}
"""


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    d = tmp_path / "config"
    shutil.copytree(EXAMPLES, d)
    return d


def write(path: Path, text: str) -> None:
    """Write and move the mtime forward, so a change is visible even on coarse-mtime filesystems."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    st = path.stat()
    if st.st_mtime_ns <= before:
        os.utime(path, ns=(st.st_atime_ns, before + 1_000_000))


class Recorder:
    def __init__(self) -> None:
        self.models: list[MeshModel] = []
        self.errors: list[list[str]] = []

    def on_change(self, model: MeshModel) -> None:
        self.models.append(model)

    def on_error(self, errors) -> None:
        self.errors.append([str(e) for e in errors])


def source(cfg: Path, rec: Recorder, interval: float = 0.2) -> FileSource:
    return FileSource(str(cfg), rec.on_change, rec.on_error, interval=interval)


def settle(src: FileSource) -> bool:
    """Two polls: the first sees a change, the second (signature stable) loads it."""
    first = src.poll()
    return first or src.poll()


# ---------------------------------------------------------------- load_directory

def test_load_directory_reads_yaml_and_yml_only_at_top_level(cfg: Path):
    base = load_directory(str(cfg)).model
    (cfg / "sub").mkdir()
    (cfg / "sub" / "more.yaml").write_text("not: [valid\n")           # not recursive
    (cfg / ".#routes.yaml").write_text("garbage: [\n")               # editor lock file
    (cfg / "routes.yaml.swp").write_text("garbage: [\n")             # not a config suffix
    (cfg / "README.md").write_text("# notes\n")
    assert load_directory(str(cfg)).model == base
    (cfg / "extra.yml").write_text(WORKLOAD.format(name="node3-pod1", address="198.18.3.1"))
    result = load_directory(str(cfg))
    assert result.errors == [] and result.model.get("Workload", "default", "node3-pod1") is not None


def test_missing_directory_and_undecodable_file(tmp_path: Path):
    assert [str(e) for e in load_directory(str(tmp_path / "nope")).errors] == [
        f"{tmp_path / 'nope'}: config directory does not exist"]
    (tmp_path / "bad.yaml").write_bytes(b"apiVersion: v1\nkind: \xff\n")
    assert [str(e) for e in load_directory(str(tmp_path)).errors] == [
        "bad.yaml:2: not valid UTF-8: invalid start byte at byte 21"]


def test_empty_directory_is_an_empty_model(tmp_path: Path):
    result = load_directory(str(tmp_path))
    assert result.errors == [] and len(result.model) == 0


# ---------------------------------------------------------------- FileSource, driven step by step

def test_valid_change_is_applied(cfg: Path):
    rec = Recorder()
    src = source(cfg, rec)
    assert settle(src) and len(rec.models) == 1 and rec.errors == []
    first = rec.models[0]
    write(cfg / "workloads.yaml", (cfg / "workloads.yaml").read_text() + "---\n" +
          WORKLOAD.format(name="node3-pod1", address="198.18.3.1"))
    assert settle(src)
    assert len(rec.models) == 2 and rec.models[1] != first
    assert rec.models[1].get("Workload", "default", "node3-pod1") is not None
    assert src.model is rec.models[1] and src.errors == []


def test_invalid_change_is_reported_and_the_last_good_model_kept(cfg: Path):
    rec = Recorder()
    src = source(cfg, rec)
    settle(src)
    good = src.model
    routes = (cfg / "routes.yaml").read_text()
    write(cfg / "routes.yaml", routes.replace("weight: 10", "weight: -10"))
    assert settle(src)
    assert rec.errors == [[("routes.yaml:32: HTTPRoute default/web-canary-split: spec.rules[1].backendRefs[1].weight: "
                           "-10 is not between 0 and 1000000")]]
    assert src.model is good and len(rec.models) == 1          # nothing else changed
    assert [str(e) for e in src.errors] == rec.errors[0]
    # the same broken state is not reported again on every poll
    assert not src.poll() and len(rec.errors) == 1
    # fixing it back to the last good content reports recovery (the errors are gone)
    write(cfg / "routes.yaml", routes)
    assert settle(src)
    assert len(rec.models) == 2 and rec.models[1] == good and src.errors == []


def test_touch_without_content_change_does_not_report_a_new_model(cfg: Path):
    rec = Recorder()
    src = source(cfg, rec)
    settle(src)
    write(cfg / "mesh.yaml", (cfg / "mesh.yaml").read_text())
    assert settle(src)
    assert len(rec.models) == 1


def test_debounce_waits_for_a_stable_directory(cfg: Path):
    """A half-written file is never loaded while the writer keeps changing it."""
    rec = Recorder()
    src = source(cfg, rec)
    settle(src)
    text = WORKLOAD.format(name="node3-pod1", address="198.18.3.1")
    path = cfg / "new.yaml"
    write(path, text[:40])          # the editor has written part of the file
    assert not src.poll()           # change seen: wait one interval
    write(path, text[:90])          # still writing
    assert not src.poll()           # changed again: wait again
    write(path, text)               # done
    assert not src.poll()
    assert src.poll()               # stable for one interval: loaded, once, complete
    assert rec.errors == [] and len(rec.models) == 2
    assert rec.models[1].get("Workload", "default", "node3-pod1") is not None


def test_a_change_during_the_read_is_not_reported(cfg: Path, monkeypatch):
    rec = Recorder()
    src = source(cfg, rec)
    settle(src)
    path = cfg / "new.yaml"
    write(path, WORKLOAD.format(name="node3-pod1", address="198.18.3.1")[:50])
    src.poll()
    real_load = src.loader.load

    def load_then_writer_continues(sig):
        result = real_load(sig)
        write(path, WORKLOAD.format(name="node3-pod1", address="198.18.3.1"))
        return result

    monkeypatch.setattr(src.loader, "load", load_then_writer_continues)
    assert not src.poll()                        # loaded a partial file, but it changed meanwhile
    assert rec.errors == [] and len(rec.models) == 1
    monkeypatch.setattr(src.loader, "load", real_load)
    assert src.poll() and len(rec.models) == 2 and rec.errors == []


def test_unchanged_files_are_not_parsed_again(cfg: Path, monkeypatch):
    calls: list[str] = []
    real = files_mod.load_file
    monkeypatch.setattr(files_mod, "load_file", lambda name, text: calls.append(name) or real(name, text))
    rec = Recorder()
    src = source(cfg, rec)
    settle(src)
    assert sorted(calls) == sorted(p.name for p in cfg.glob("*.yaml"))
    calls.clear()
    write(cfg / "policies.yaml", (cfg / "policies.yaml").read_text().replace("maxConnections: 1000", "maxConnections: 999"))
    settle(src)
    assert calls == ["policies.yaml"] and len(rec.models) == 2


def test_load_now_skips_the_debounce(cfg: Path):
    rec = Recorder()
    src = source(cfg, rec)
    result = src.load_now()
    assert result.errors == [] and rec.models == [result.model]
    assert not src.poll()           # nothing changed since


def test_directory_removed_and_restored(cfg: Path, tmp_path: Path):
    rec = Recorder()
    src = source(cfg, rec)
    settle(src)
    moved = tmp_path / "moved"
    cfg.rename(moved)
    assert settle(src)
    assert rec.errors == [[f"{cfg}: config directory does not exist"]] and src.model is not None
    moved.rename(cfg)
    assert settle(src) and len(rec.models) == 2 and src.errors == []


# ---------------------------------------------------------------- FileSource.run, with a real event loop

async def wait_for(predicate, deadline: float = 5.0) -> None:
    """Wait until predicate() holds; the deadline is generous (the contract is ~1 s, not tested here)."""
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.01)


def test_run_applies_a_valid_change_and_reports_an_invalid_one(cfg: Path):
    async def scenario():
        rec = Recorder()
        src = source(cfg, rec, interval=0.05)
        task = asyncio.create_task(src.run())
        try:
            await wait_for(lambda: len(rec.models) == 1)
            write(cfg / "extra.yaml", WORKLOAD.format(name="node3-pod1", address="198.18.3.1"))
            await wait_for(lambda: len(rec.models) == 2)
            assert rec.models[1].get("Workload", "default", "node3-pod1") is not None
            write(cfg / "extra.yaml", WORKLOAD.format(name="node3-pod1", address="not-an-ip"))
            await wait_for(lambda: len(rec.errors) == 1)
            assert rec.errors[0] == [('extra.yaml:4: Workload default/node3-pod1: spec.address: "not-an-ip" is not '
                                     'an IPv4 address')]
            assert src.model == rec.models[1] and len(rec.models) == 2
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
