"""Regenerates the Python code for protos/tribune/v1/*.proto. Never edit the output by hand.

    python protos/generate.py [--out DIR]     (default: protos/, next to the .proto files)

The proto folder mirrors the package path (tribune/v1/), so the generated
`from tribune.v1 import reward_pb2` imports resolve once `protos/` is a source root
(pyproject maps the `tribune` package to protos/tribune). Use a grpcio-tools no newer
than the runtime grpcio (pinned in pyproject's dev extra).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tribune").rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in out.rglob("*_pb2*.py*"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT)
    for path in generate(ap.parse_args().out):
        print(path)


if __name__ == "__main__":
    sys.exit(main())
