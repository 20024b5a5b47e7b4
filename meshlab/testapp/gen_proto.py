"""Regenerate the Python code for echo.proto (needs grpcio-tools, a dev dependency).

    python -m meshlab.testapp.gen_proto            # rewrite the committed files
    python -m meshlab.testapp.gen_proto --out DIR  # write into DIR/meshlab/testapp/ instead

The proto is compiled with the repository root as include path, so the descriptor is
registered as "meshlab/testapp/echo.proto" (no clash with other echo.proto files) and
the generated stub imports its messages through the package
(`from meshlab.testapp import echo_pb2`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent.parent
PROTO = "meshlab/testapp/echo.proto"
GENERATED = ("echo_pb2.py", "echo_pb2.pyi", "echo_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Compile echo.proto into out_root/meshlab/testapp/; return the generated files."""
    from grpc_tools import protoc  # dev dependency: imported only when regenerating

    out_root = Path(out_root)
    (out_root / "meshlab" / "testapp").mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{REPO_ROOT}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", PROTO]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} for {PROTO}")
    files = [out_root / "meshlab" / "testapp" / name for name in GENERATED]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise RuntimeError(f"protoc did not produce: {', '.join(missing)}")
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m meshlab.testapp.gen_proto", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO_ROOT,
                    help="output root (files land in OUT/meshlab/testapp/); default: the repository")
    args = ap.parse_args(argv)
    for f in generate(args.out):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
