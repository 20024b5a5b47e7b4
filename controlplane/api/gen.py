"""Regenerate the Python code of the agent <-> control-plane API from the .proto files.

    python -m controlplane.api.gen            # rewrites controlplane/api/*_pb2*.py(i)
    python -m controlplane.api.gen --out DIR  # writes DIR/controlplane/api/... (the staleness test)

The .proto files live in ``controlplane/api/`` and are compiled with the repository root
as the include path, so the generated modules import each other as ``controlplane.api.…``.
Needs ``grpcio-tools`` (a dev dependency); the generated files are committed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

API_DIR = Path(__file__).resolve().parent
REPO_ROOT = API_DIR.parent.parent
PROTOS = ("controlplane/api/discovery.proto", "controlplane/api/certificates.proto")


def generated_files(proto: str) -> list[str]:
    stem = proto[: -len(".proto")]
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def generate(out: Path = REPO_ROOT) -> list[Path]:
    """Run protoc for every proto; returns the files written (relative names under ``out``)."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out = Path(out)
    (out / "controlplane" / "api").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for proto in PROTOS:
        rc = protoc.main([
            "grpc_tools.protoc",
            f"-I{REPO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            proto,
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto} (exit {rc})")
        written += [out / f for f in generated_files(proto)]
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository)")
    args = ap.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
