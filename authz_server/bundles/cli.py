"""``authz-server bundle build | sign | verify | serve``: make, check and serve OPA bundles.

The flags mirror ``opa build`` and ``opa sign`` where they mean the same thing
(``-o/--output``, ``-r/--revision``, ``--signing-key``, ``--signing-alg``, ``--claims-file``,
``--output-file-path``, ``--verification-key``, ``--verification-key-id``, ``--scope``,
``--exclude-files-verify``). ``--signing-key`` is a PEM file, PEM text, or (for HS256/384/512)
the secret itself, as in OPA.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from ..errors import AuthzError
from .archive import read_tarball, write_tarball
from .bundle import MANIFEST, bundle_from_files
from .signing import (DEFAULT_ALGORITHM, SIGNATURES_FILE, SUPPORTED_ALGORITHMS, KeyConfig, VerificationConfig,
                      sign_files, signatures_document)

BUNDLE_FILES = (".rego", "data.json", "data.yaml", "data.yml", MANIFEST, "_test.yaml", "_test.yml", "_test.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bundle_command", metavar="SUBCOMMAND", required=True)
    build = sub.add_parser("build", help="build a .tar.gz bundle from a bundle folder (like 'opa build -b')")
    build.add_argument("path", help="the bundle folder (.rego, data.json/data.yaml, .manifest)")
    build.add_argument("-b", "--bundle", action="store_true", help="accepted for 'opa build' compatibility")
    build.add_argument("-o", "--output", default="bundle.tar.gz", help="output file (default bundle.tar.gz)")
    build.add_argument("-r", "--revision", help="set the manifest's revision")
    _signing_flags(build)
    build.add_argument("--key-id", default="", help="kid for the signature's header (and the keyid claim)")
    sign = sub.add_parser("sign", help="write .signatures.json for a bundle folder or .tar.gz (like 'opa sign')")
    sign.add_argument("path", help="the bundle folder or .tar.gz")
    sign.add_argument("-b", "--bundle", action="store_true", help="accepted for 'opa sign' compatibility")
    sign.add_argument("-o", "--output-file-path", default=".", help="folder for .signatures.json (default .)")
    _signing_flags(sign, required=True)
    sign.add_argument("--key-id", default="", help="kid for the signature's header (and the keyid claim)")
    verify = sub.add_parser("verify", help="check a .tar.gz bundle: signature, manifest, roots")
    verify.add_argument("path", help="the .tar.gz bundle")
    verify.add_argument("--verification-key", help="PEM file or text, or the HMAC secret")
    verify.add_argument("--verification-key-id", default="default", help="the key's id (default 'default')")
    verify.add_argument("--signing-alg", default=DEFAULT_ALGORITHM, choices=SUPPORTED_ALGORITHMS)
    verify.add_argument("--scope", default="", help="the scope the signature must carry")
    verify.add_argument("--exclude-files-verify", action="append", default=[], help="file pattern not verified")
    serve = sub.add_parser("serve", help="serve a folder of bundles over OPA's bundle API, and collect "
                                         "decision logs and status (tests and the demo)")
    serve.add_argument("root", help="folder of NAME.tar.gz files and NAME/ bundle folders")
    serve.add_argument("--addr", default="127.0.0.1:8181", help="host:port (default 127.0.0.1:8181)")
    serve.add_argument("--token", default="", help="require 'Authorization: Bearer TOKEN'")
    serve.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    serve.add_argument("--tls-key", help="... and this key")
    serve.add_argument("--client-ca", help="require client certificates issued by this CA")
    serve.add_argument("--fault", default="none", help="none, slow[:SECONDS], error[:STATUS], truncate or down, "
                                                       "optionally @/path-prefix")
    serve.add_argument("--no-long-polling", action="store_true", help="never hold a request (plain polling)")
    serve.add_argument("--logs-file", help="append the decision events received, one JSON per line")
    serve.add_argument("--ready-file", help="write the bound address as JSON here once serving")


def _signing_flags(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    parser.add_argument("--signing-key", required=required, help="PEM file or text, or the HMAC secret")
    parser.add_argument("--signing-alg", default=DEFAULT_ALGORITHM, choices=SUPPORTED_ALGORITHMS,
                        help="default RS256")
    parser.add_argument("--claims-file", help="JSON file of extra claims for the signature (e.g. scope)")


def key_material(value: str) -> str:
    """OPA's reading of a key flag: PEM text, else a file that exists, else the text itself."""
    if value.startswith("-----BEGIN"):
        return value
    path = Path(value)
    if path.is_file():
        return path.read_text()
    return value


def folder_files(root: Path) -> list[tuple[str, bytes]]:
    """The bundle files of a folder (hidden folders and .signatures.json left out)."""
    if not root.is_dir():
        raise AuthzError(f"{root} is not a folder", code="bundle_invalid")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(BUNDLE_FILES) and name != SIGNATURES_FILE:
                path = Path(dirpath) / name
                files.append((path.relative_to(root).as_posix(), path.read_bytes()))
    return files


def _claims(path: str | None) -> dict[str, object] | None:
    if not path:
        return None
    claims = json.loads(Path(path).read_text())
    if not isinstance(claims, dict):
        raise AuthzError(f"{path}: claims must be a JSON object", code="bundle_invalid")
    return claims


def _build(args: argparse.Namespace) -> int:
    files = folder_files(Path(args.path))
    if args.revision is not None:
        manifest = {}
        for path, raw in files:
            if path == MANIFEST:
                manifest = json.loads(raw)
        manifest["revision"] = args.revision
        files = [(p, r) for p, r in files if p != MANIFEST] + [(MANIFEST, json.dumps(manifest, indent=1).encode())]
    bundle = bundle_from_files("build", files)  # manifest, roots and data layout checked before writing
    if args.signing_key:
        token = sign_files(files, key=key_material(args.signing_key), algorithm=args.signing_alg,
                           keyid=args.key_id, claims=_claims(args.claims_file))
        files.append((SIGNATURES_FILE, signatures_document(token)))
    Path(args.output).write_bytes(write_tarball(files))
    print(f"{args.output}: {len(bundle.modules)} modules, revision {bundle.revision!r}"
          f"{', signed' if args.signing_key else ''}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    source = Path(args.path)
    files = folder_files(source) if source.is_dir() else read_tarball(source.read_bytes())
    token = sign_files(files, key=key_material(args.signing_key), algorithm=args.signing_alg, keyid=args.key_id,
                       claims=_claims(args.claims_file))
    out = Path(args.output_file_path) / SIGNATURES_FILE
    out.write_bytes(signatures_document(token))
    print(f"{out}: {len([f for f in files if f[0] != SIGNATURES_FILE])} files signed")
    return 0


def _verify(args: argparse.Namespace) -> int:
    verification = None
    if args.verification_key:
        key = KeyConfig(key=key_material(args.verification_key), algorithm=args.signing_alg)
        verification = VerificationConfig(keys={args.verification_key_id: key}, keyid=args.verification_key_id,
                                          scope=args.scope,
                                          exclude_files=tuple(args.exclude_files_verify), required=True)
    bundle = bundle_from_files("verify", read_tarball(Path(args.path).read_bytes()), verification=verification)
    print(f"{args.path}: ok: revision {bundle.revision!r}, roots {list(bundle.manifest.roots)}, "
          f"{len(bundle.modules)} modules{', signature verified' if verification else ''}")
    return 0


async def _serve(args: argparse.Namespace) -> int:
    import signal
    import ssl

    from .server import ControlPlaneServer, Faults, start_server

    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.client_ca:
            context.load_verify_locations(cafile=args.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    state = ControlPlaneServer(root=Path(args.root), token=args.token, faults=Faults.parse(args.fault),
                               logs_file=Path(args.logs_file) if args.logs_file else None,
                               long_polling=not args.no_long_polling)
    runner, bound = await start_server(state, args.addr, ssl_context=context)
    print(f"serving bundles from {args.root} at {'https' if context else 'http'}://{bound}", file=sys.stderr)
    if args.ready_file:
        Path(args.ready_file).write_text(json.dumps({"addr": bound, "pid": os.getpid()}))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        if args.bundle_command == "build":
            return _build(args)
        if args.bundle_command == "sign":
            return _sign(args)
        if args.bundle_command == "verify":
            return _verify(args)
        return asyncio.run(_serve(args))
    except AuthzError as exc:
        print(f"authz-server bundle: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"authz-server bundle: {exc}", file=sys.stderr)
        return 2
