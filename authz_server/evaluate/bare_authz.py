"""The yardstick: the least a Python ext_authz gRPC server can do (grpc.aio + uvloop, always allow).

Our full pipeline is measured against this in the same run. Nothing here parses the
request or decides anything; it is the cost of Python gRPC itself.
"""

from __future__ import annotations

import argparse

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

ALLOW = external_auth_pb2.CheckResponse()
ALLOW.status.code = 0
ALLOW.ok_response.SetInParent()


class AlwaysAllow(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request, context):  # noqa: N802 - gRPC method name
        return ALLOW


async def serve(addr: str, ready_file: str | None) -> None:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AlwaysAllow(), server)
    port = server.add_insecure_port(addr)
    await server.start()
    if ready_file:
        host = addr.rpartition(":")[0]
        with open(ready_file, "w") as out:
            out.write(f"{host}:{port}")
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", default="127.0.0.1:0")
    parser.add_argument("--ready-file")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.addr, args.ready_file))


if __name__ == "__main__":
    main()
