"""Build step: protobuf + gRPC stubs with typed .pyi from `proto/` (run by setup.py and `make proto`).

It lives outside the package: setup.py runs it in a build environment where the SDK's dependencies are absent.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTOS = ("omnigen2/v1/omnigen2.proto",)


def generate_stubs(proto_root: Path, out: Path) -> None:
    """Write the stubs under `out` (package-relative, so `omnigen2/v1/omnigen2_pb2.py`); needs grpcio-tools."""
    if not proto_root.is_dir():  # building from an sdist: the stubs were generated when it was made
        return
    from grpc_tools import protoc

    args = [f"-I{proto_root}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(["protoc", *args, *(str(proto_root / p) for p in PROTOS)]) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(PROTOS)} under {proto_root}")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    generate_stubs(here.parent / "proto", here)
    print("stubs written to client/omnigen2/v1/", file=sys.stderr)
