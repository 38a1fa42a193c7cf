"""Generates the Python code for the optserve API from proto/optserve/v1/*.proto.

    python proto/generate.py            # rewrites proto/v1/
    python proto/generate.py OUT_DIR    # writes elsewhere (the drift test compares)

The .proto files are compiled as if they lived at optserve/proto/v1/, so that the
generated modules import each other as `optserve.proto.v1`, the name they are
installed under. The protobuf package stays `optserve.v1`.
"""
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = sorted((HERE / "optserve" / "v1").glob("*.proto"))


def generate(out_dir: pathlib.Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tree = pathlib.Path(tmp) / "src"
        staged = tree / "optserve" / "proto" / "v1"
        staged.mkdir(parents=True)
        for src in SOURCES:
            shutil.copy(src, staged / src.name)
        gen = pathlib.Path(tmp) / "gen"
        gen.mkdir()
        include = str(pathlib.Path(protoc.__file__).parent / "_proto")
        args = ["protoc", f"-I{tree}", f"-I{include}", f"--python_out={gen}",
                f"--pyi_out={gen}", f"--grpc_python_out={gen}"]
        args += [str(staged / s.name) for s in SOURCES]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        for f in sorted((gen / "optserve" / "proto" / "v1").iterdir()):
            shutil.copy(f, out_dir / f.name)
    init = out_dir / "__init__.py"
    init.write_text('"""Generated code for the optserve.v1 API. Do not edit: run proto/generate.py."""\n')


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "v1")
