"""Which agent generation this is on a state directory, and the build it runs.

``<stateDir>/generation.json`` counts agent starts (restarts after a stop, a crash, or a
hand-off) and hand-offs, so ``hostmesh_agent_restarts_total`` and
``hostmesh_agent_handoffs_total`` keep counting across processes (a successor's value
continues its predecessor's, which is what Prometheus' ``increase()`` expects of a
counter). The build id names the code that runs: the version plus a digest of the agent's
sources and eBPF programs, so two builds of one version still differ.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from hostmesh import __version__

FILE_NAME = "generation.json"


@dataclass(frozen=True)
class Lineage:
    generation: int = 0  # 0: no agent ever started here
    handoffs: int = 0

    def successor(self, *, predecessor: "Lineage | None" = None) -> "Lineage":
        """The next agent's lineage; ``predecessor``: handed over by a running agent."""
        base = self if predecessor is None else Lineage(max(self.generation, predecessor.generation),
                                                        max(self.handoffs, predecessor.handoffs))
        return Lineage(base.generation + 1, base.handoffs + (1 if predecessor is not None else 0))

    @property
    def restarts(self) -> int:
        return max(0, self.generation - 1)


def load(state_dir: str) -> Lineage:
    """What the previous agents left; a missing or unreadable file starts from zero."""
    try:
        doc = json.loads(Path(state_dir, FILE_NAME).read_text())
        return Lineage(int(doc.get("generation", 0)), int(doc.get("handoffs", 0)))
    except (OSError, ValueError, TypeError, AttributeError):
        return Lineage()


def save(state_dir: str, lineage: Lineage) -> None:
    path = Path(state_dir, FILE_NAME)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"generation": lineage.generation, "handoffs": lineage.handoffs}) + "\n")
    os.replace(tmp, path)


def build_id() -> str:
    """``<version>+<12 hex digits>`` over the agent's Python sources and bpf/ programs."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    files = sorted(root.rglob("*.py"))
    bpf = Path(os.environ.get("HOSTMESH_BPF_DIR") or root.parent / "bpf")
    if bpf.is_dir():
        files += sorted(p for p in bpf.rglob("*") if p.suffix in (".c", ".h"))
    for f in files:
        try:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        except OSError:
            continue
    return f"{__version__}+{h.hexdigest()[:12]}"
