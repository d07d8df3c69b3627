"""The committed Python stubs are exactly what protos/generate.sh makes from the .proto files."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOS = sorted(p.name for p in (ROOT / "protos").glob("*.proto"))
STUBS = [
    f"{Path(proto).stem}{suffix}"
    for proto in PROTOS
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stubs")
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I.",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[f"protos/{name}" for name in PROTOS],
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return out / "protos"


def test_every_proto_has_committed_stubs():
    assert PROTOS == ["expert.proto", "router.proto"]
    missing = [name for name in STUBS if not (ROOT / "protos" / name).is_file()]
    assert not missing, f"run protos/generate.sh: missing {missing}"


@pytest.mark.parametrize("name", STUBS)
def test_committed_stub_matches_the_proto(regenerated, name):
    committed = (ROOT / "protos" / name).read_bytes()
    fresh = (regenerated / name).read_bytes()
    assert committed == fresh, f"protos/{name} is stale: run protos/generate.sh"
