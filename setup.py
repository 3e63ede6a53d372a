"""Build hook: the protobuf and gRPC stubs are generated from ``protos/`` whenever the package is
built, so they are never committed and a wheel or sdist install has them.

Everything else about the package is in pyproject.toml. ``build_py`` here also

- runs ``grpc_tools.protoc`` over ``protos/specdec/v1/*.proto`` into the build's ``specdec/v1``
  (``*_pb2.py``, ``*_pb2_grpc.py``, ``*_pb2.pyi``), and
- copies ``protos/`` (the .proto files and the gRPC service config with the retry policy) into the
  build's ``specdec/protos``, so that clients in other languages find the API definition in an
  installed package (``python -c "import specdec.client as c; print(c.PROTO_DIR)"``).

An editable install (``pip install -e .``) writes the stubs into the source tree instead, as
``make protos`` does; ``specdec.client.PROTO_DIR`` is then the source tree's ``protos/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"
PROTO_FILES = ("*.proto", "*.json")  # what ships under specdec/protos


def generate_stubs(out: Path) -> list[Path]:
    """Run protoc over every .proto under protos/specdec/v1 into ``out`` (a root like the
    repository's: the stubs land in ``out/specdec/v1``); returns the files written."""
    from grpc_tools import protoc  # a build requirement (pyproject.toml [build-system])

    protos = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "specdec" / "v1").glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTOS / 'specdec' / 'v1'}")
    include = str(Path(protoc.__file__).parent / "_proto")  # google/protobuf/*.proto
    args = ["grpc_tools.protoc", f"-I{PROTOS}", f"-I{include}",
            f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {' '.join(protos)}")
    v1 = out / "specdec" / "v1"
    return sorted(p for pattern in ("*_pb2.py", "*_pb2_grpc.py", "*_pb2.pyi") for p in v1.glob(pattern))


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            generate_stubs(ROOT)  # in place, next to the sources, as `make protos` does
            self._generated = []
            return
        build_lib = Path(self.build_lib)
        self._generated = generate_stubs(build_lib)
        shipped = build_lib / "specdec" / "protos"
        for pattern in PROTO_FILES:
            for source in PROTOS.rglob(pattern):
                target = shipped / source.relative_to(PROTOS)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                self._generated.append(target)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), *map(str, getattr(self, "_generated", []))]


setup(cmdclass={"build_py": BuildPyWithStubs})
