"""Regenerate the Python stubs committed next to the .proto files:

    python -m loraplex.protos.generate

protoc writes `from loraplex.v1 import serving_pb2` into the `_grpc` module (imports follow the
proto path); the stubs live in the package `loraplex.protos.loraplex.v1`, so that line is rewritten
to a relative import. tests/test_grpc.py runs `generate` into a temporary folder and diffs.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ["loraplex/v1/serving.proto"]


def generate(out_dir: Path = PROTO_ROOT) -> list[Path]:
    """Write `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py` for every proto under out_dir; return them."""
    from grpc_tools import protoc
    out_dir = Path(out_dir)
    written = []
    for proto in PROTO_FILES:
        (out_dir / proto).parent.mkdir(parents=True, exist_ok=True)
        args = ["grpc_tools.protoc", f"--proto_path={PROTO_ROOT}", f"--python_out={out_dir}",
                f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", proto]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        stem = out_dir / proto[: -len(".proto")]
        grpc_module = stem.with_name(stem.name + "_pb2_grpc.py")
        package = proto.rsplit("/", 1)[0].replace("/", ".")
        source = grpc_module.read_text()
        grpc_module.write_text(re.sub(rf"^from {re.escape(package)} import ", "from . import ", source, flags=re.M))
        written += [stem.with_name(stem.name + suffix) for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT):
        print(path)
