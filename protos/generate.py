"""Generate the Python gRPC stubs in kme/rpc/v1/ from protos/kme/rpc/v1/*.proto.

    python protos/generate.py          # regenerate in place
    python protos/generate.py --check  # fail (exit 1) if the committed stubs are stale

The stubs are committed so that an installed kmstn needs no protoc. The check
regenerates into a scratch directory and compares byte for byte, so it fails
whenever a .proto changed without its stubs, or a stub was edited by hand.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("kme/rpc/v1")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        sys.exit(f"{name} not found: install the test extra (pip install -e .[test])")
    return found


def generate(out: Path) -> list[Path]:
    protos = sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    subprocess.run(cmd, check=True)  # noqa: S603 - fixed argv, no shell
    return sorted(
        p for p in (out / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    target = ROOT / PACKAGE_DIR
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = sorted(p for p in target.iterdir() if p.name.endswith(GENERATED_SUFFIXES))
        fresh_names = {p.name for p in fresh}
        stale = sorted(
            {p.name for p in committed} ^ fresh_names
            | {
                p.name
                for p in fresh
                if not (target / p.name).exists()
                or not filecmp.cmp(p, target / p.name, shallow=False)
            }
        )
        if args.check:
            if stale:
                print("stale generated stubs in kme/rpc/v1/: " + ", ".join(stale))
                print("run: python protos/generate.py")
                return 1
            print(f"protos: {len(fresh)} generated files up to date")
            return 0
        for p in committed:
            if p.name not in fresh_names:
                p.unlink()
        for p in fresh:
            shutil.copyfile(p, target / p.name)
        print(f"protos: wrote {len(fresh)} files to {PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
