"""Compiles protos/*.proto into authz_server/_proto/ with grpcio-tools at build time, and the
two C extensions: ``authz_server._volatile_cut`` (the gRPC front's repeat key; for the audit log, a
request's shape read from that key, the loop over a request's headers and the usual record) and
``authz_server.tracing._hooks`` (tracing's request-path hooks and the usual span).

Everything else about the package is in pyproject.toml. The generated modules are written
into the source tree (and ignored by git) so editable and regular installs both see them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"
OUT = ROOT / "authz_server" / "_proto"


def compile_protos() -> None:
    from grpc_tools import protoc

    OUT.mkdir(exist_ok=True)
    (OUT / "__init__.py").write_text('"""Generated from protos/ at build time; do not edit."""\n')
    include = Path(protoc.__file__).parent / "_proto"
    for proto in sorted(PROTOS.glob("*.proto")):
        code = protoc.main([
            "grpc_tools.protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={OUT}", f"--pyi_out={OUT}",
            f"--grpc_python_out={OUT}", str(proto),
        ])
        if code != 0:
            sys.exit(f"protoc failed on {proto}")
    # grpc_tools writes absolute imports between generated modules; make them package-relative.
    for module in OUT.glob("*_pb2_grpc.py"):
        text = module.read_text()
        for proto in PROTOS.glob("*.proto"):
            name = proto.stem + "_pb2"
            text = text.replace(f"import {name} as", f"from . import {name} as")
        module.write_text(text)


class BuildWithProtos(build_py):
    def run(self) -> None:
        compile_protos()  # again, in case protos changed since setup.py was loaded
        super().run()


# Before setup(): package discovery must already see authz_server._proto.
compile_protos()
# Optional: without a C compiler the server still works, it only never replays gRPC repeats
# (``authz_server.envoy.cut_volatile`` then always answers None) and traces with the hooks' Python form.
setup(cmdclass={"build_py": BuildWithProtos},
      ext_modules=[Extension(name, [source], optional=True, extra_compile_args=["-O2", "-Wall", "-Wextra"],
                             depends=["authz_server/_slots.h"])
                   for name, source in (("authz_server._volatile_cut", "authz_server/_volatile_cut.c"),
                                        ("authz_server.tracing._hooks", "authz_server/tracing/_hooks.c"))])
