"""A small upstream service for demos and tests: answers with what it received, as JSON.

Shows what reached the service after Envoy and authz-server: the verified identity
headers, and that the user's raw token did not.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from ..http import HttpRequest, HttpResponse, serve_http


def echo(service: str):  # type: ignore[no-untyped-def]
    def handler(request: HttpRequest) -> HttpResponse:
        payload = {
            "service": service, "method": request.method, "path": request.target,
            "headers": request.headers, "body": request.body.decode("utf-8", "replace"),
        }
        return HttpResponse(200, [("content-type", "application/json")], json.dumps(payload).encode())

    return handler


async def serve_echo(address: str, service: str = "upstream") -> tuple[asyncio.Server, str]:
    return await serve_http(echo(service), address)


def main() -> None:
    parser = argparse.ArgumentParser(description="echo upstream (demo and tests)")
    parser.add_argument("--addr", default="127.0.0.1:8080")
    parser.add_argument("--name", default="upstream")
    args = parser.parse_args()

    async def run() -> None:
        server, bound = await serve_echo(args.addr, args.name)
        print(f"echo upstream {args.name} on {bound}", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
