"""``authz-server`` command line: argument parsing only.

Each command lives in the module that owns it, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them, so ``--help`` stays cheap (modules are
imported when their command runs, or to build its parser).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("authz_server.serve", "run the ext_authz server (gRPC, and HTTP with --http-addr)"),
    "policy": ("authz_server.policy.cli", "policy tools: 'policy test DIR' runs the Rego tests in DIR"),
    "demo": ("authz_server.mesh.demo", "bring up the demo on this machine and walk through it"),
    "devidp": ("authz_server.devidp.cli", "dev OIDC provider (development only): 'devidp serve --config FILE'"),
    "identity": ("authz_server.workload.cli", "dev SPIFFE issuer (development only): 'identity serve --config FILE'"),
    "audit": ("authz_server.audit.cli", "decision audit log: 'audit query' lists what a subject did and what was denied"),
    "bundle": ("authz_server.bundles.cli", "OPA bundles: 'bundle build', 'bundle sign', 'bundle verify', 'bundle serve'"),
    "shadow": ("authz_server.shadow.cli", "shadow rollout: 'shadow report' summarises disagreements, 'shadow promote'"),
    "render-configs": ("authz_server.mesh.render", "rewrite the Envoy configs committed under envoy/"),
    "evaluate": ("authz_server.evaluate.cli", "measure the mesh: attacks, accuracy against an oracle, performance; writes DIR/report.md"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="authz-server", description="Zero-trust authorization for Envoy ext_authz.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(command)
        command.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
