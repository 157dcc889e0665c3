"""The deployment files, checked without a Docker engine or a cluster.

docker-compose.yml (and what it mounts and builds), the SPIRE configs and registration
entries, the Keycloak realm, the authz-server configs, and deploy/kubernetes/ (yamllint,
kubernetes-validate against Kubernetes 1.31, Istio resources by hand, the kustomize build
when kubectl is there). Consistency is the point: the names one file uses are the names
the others define (socket paths, SPIFFE IDs, service names, ports, issuers).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from authz_server.config import load_config
from authz_server.sharedstate import parse_store_url

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
K8S = REPO / "deploy" / "kubernetes"
TRUST_DOMAIN = "example.org"
SERVICES = ("frontend", "orders", "payments")
AUTHZ_ID = f"spiffe://{TRUST_DOMAIN}/authz-server"
AGENT_SOCKET = "/run/spire/sockets/agent.sock"
SPIFFE_ID = re.compile(r"spiffe://[A-Za-z0-9._-]+(?:/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*")
ISTIO_GROUPS = ("networking.istio.io", "security.istio.io", "install.istio.io")
# Files under deploy/kubernetes/ that are not objects for the API server.
K8S_NOT_MANIFESTS = {"kustomization.yaml", "authz-server/config.yaml", "spire/values.yaml"}


# -- helpers ------------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) for each short-syntax volume of a service."""
    found = []
    for item in service.get("volumes", []):
        assert isinstance(item, str), f"use the short volume syntax, got {item!r}"
        parts = item.split(":")
        source, target = parts[0], parts[1]
        found.append((source, target, parts[2] if len(parts) > 2 else "rw"))
    return found


def mount_source(service: dict[str, Any], target: str) -> str:
    """Which host path or named volume a service mounts at ``target`` (or a parent of it)."""
    best = ""
    source_of = ""
    for source, mounted_at, _mode in mounts(service):
        if (target == mounted_at or target.startswith(mounted_at.rstrip("/") + "/")) and len(mounted_at) > len(best):
            best, source_of = mounted_at, source
    assert best, f"nothing is mounted at {target}"
    return source_of


def envoy_config(service: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "envoy" / "compose" / f"{service}.yaml").read_text())


def clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def listeners(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in config["static_resources"]["listeners"]}


def endpoint(cluster: dict[str, Any]) -> dict[str, Any]:
    return cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def sds_names(config: dict[str, Any]) -> set[str]:
    return {n["name"] for n in walk(config) if isinstance(n, dict) and "sds_config" in n and "name" in n}


def hcl_value(text: str, key: str) -> str:
    """The string value of ``key = "..."`` in a SPIRE HCL config (one occurrence expected)."""
    found = re.findall(rf'^\s*{re.escape(key)}\s*=\s*"([^"]*)"', text, flags=re.MULTILINE)
    assert len(found) == 1, f"{key} appears {len(found)} times"
    return found[0]


def spiffe_ids_in(text: str) -> set[str]:
    return set(SPIFFE_ID.findall(text))


def entries() -> list[dict[str, Any]]:
    return json.loads((REPO / "spire" / "entries.json").read_text())["entries"]


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        relative = path.relative_to(K8S).as_posix()
        if relative in K8S_NOT_MANIFESTS or relative.startswith("policies/"):
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def istio_operator() -> dict[str, Any]:
    return yaml.safe_load((K8S / "istio" / "istio-operator.yaml").read_text())


# -- docker-compose.yml -------------------------------------------------------------------

def test_compose_file_parses_with_the_topology() -> None:
    data = compose()
    assert str(data["version"]).startswith("3"), "compose file format 3.x (docker-compose 1.29 parses it)"
    expected = {"bootstrap", "spire-server", "spire-agent", "spire-entries", "keycloak", "redis", "authz-server-1",
                "authz-server-2", "partner-issuer", *SERVICES, *(f"{s}-sidecar" for s in SERVICES)}
    assert set(data["services"]) == expected
    declared = set(data.get("volumes") or {})
    for name, service in data["services"].items():
        for source, _target, _mode in mounts(service):
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} mounts undeclared volume {source}"


def test_docker_compose_config_accepts_it() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose)")
    done = subprocess.run([binary, "-f", str(COMPOSE_FILE), "config", "-q"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def test_every_mounted_and_built_path_exists() -> None:
    for name, service in services().items():
        for source, _target, _mode in mounts(service):
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts {source}, missing from the repository"
            elif source.startswith("/"):
                # The only host path outside the repository: the Docker socket, for the SPIRE
                # agent's docker workload attestor.
                assert (name, source) == ("spire-agent", "/var/run/docker.sock"), f"{name} mounts host path {source}"
        build = service.get("build")
        if build is not None:
            context = REPO / (build["context"] if isinstance(build, dict) else build)
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            assert dockerfile.is_file(), f"{name} builds from {dockerfile}, missing"


def test_images_are_pinned() -> None:
    for name, service in services().items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin an image tag, got {image!r}"
    assert services()["frontend-sidecar"]["image"].startswith("envoyproxy/envoy:v1.40.")
    assert services()["spire-server"]["image"].endswith(":1.15.3")
    assert services()["spire-agent"]["image"].endswith(":1.15.3")
    assert "SPIRE_VERSION=1.15.3" in (REPO / "spire" / "entries" / "Dockerfile").read_text()


def test_start_order_is_by_condition() -> None:
    svc = services()

    def condition(service: str, on: str) -> str:
        return svc[service]["depends_on"][on]["condition"]

    assert condition("spire-server", "bootstrap") == "service_completed_successfully"
    assert condition("keycloak", "bootstrap") == "service_completed_successfully"
    assert condition("spire-entries", "spire-server") == "service_healthy"
    assert condition("spire-agent", "spire-server") == "service_healthy"
    for replica in ("authz-server-1", "authz-server-2"):
        assert condition(replica, "spire-entries") == "service_completed_successfully"
        assert condition(replica, "spire-agent") == "service_healthy"
        assert condition(replica, "redis") == "service_healthy"
        assert condition(replica, "keycloak") == "service_healthy"
    for name in SERVICES:
        assert condition(f"{name}-sidecar", "spire-entries") == "service_completed_successfully"
        assert condition(f"{name}-sidecar", "spire-agent") == "service_healthy"
    for one_shot in ("bootstrap", "spire-entries"):
        assert svc[one_shot]["restart"] == "no"


# -- the sidecars (rendered by the lead's code) against the compose file ------------------

@pytest.mark.parametrize("service", SERVICES)
def test_sidecar_config_fits_the_compose_file(service: str) -> None:
    svc = services()
    sidecar, app = svc[f"{service}-sidecar"], svc[service]
    assert mount_source(sidecar, "/etc/envoy/envoy.yaml") == f"./envoy/compose/{service}.yaml"
    assert sidecar["command"][:3] == ["envoy", "-c", "/etc/envoy/envoy.yaml"]
    config = envoy_config(service)
    found = clusters(config)

    # SDS and the Workload API: one socket, shared through a named volume with the agent.
    assert endpoint(found["spiffe_workload_api"]) == {"pipe": {"path": AGENT_SOCKET}}
    socket_dir = os.path.dirname(AGENT_SOCKET)
    assert mount_source(sidecar, AGENT_SOCKET) == mount_source(svc["spire-agent"], AGENT_SOCKET) == "spire-agent-socket"
    assert mount_source(svc["authz-server-1"], AGENT_SOCKET) == "spire-agent-socket"
    assert hcl_value((REPO / "spire" / "agent" / "agent.conf").read_text(), "socket_path") == AGENT_SOCKET
    assert any(t == socket_dir for _s, t, _m in mounts(svc["spire-agent"]))

    # The certificate it asks for is the SPIFFE ID its container label is registered under.
    own_id = f"spiffe://{TRUST_DOMAIN}/{service}"
    assert own_id in sds_names(config) and "ALL" in sds_names(config)
    entry = next(e for e in entries() if e["spiffe_id"] == own_id)
    label_key, label_value = entry["selectors"][0]["value"].removeprefix("label:").split(":", 1)
    assert sidecar["labels"][label_key] == label_value

    # ext_authz: authz-server:9191 over mTLS, expecting authz-server's SPIFFE ID.
    authz = found["authz"]
    assert authz["type"] == "STRICT_DNS"
    assert endpoint(authz) == {"socket_address": {"address": "authz-server", "port_value": 9191}}
    for replica in ("authz-server-1", "authz-server-2"):
        assert "authz-server" in svc[replica]["networks"]["default"]["aliases"]
    pinned = [m["matcher"]["exact"] for m in walk(authz) if isinstance(m, dict) and m.get("san_type") == "URI"]
    assert pinned == [AUTHZ_ID]

    # The app shares the sidecar's network namespace and listens where the app cluster points.
    assert app["network_mode"] == f"service:{service}-sidecar"
    assert endpoint(found["app"]) == {"socket_address": {"address": "127.0.0.1", "port_value": 8080}}
    assert app["entrypoint"] == ["python", "-m", "authz_server.mesh.upstream"]
    assert app["command"] == ["--addr", "127.0.0.1:8080", "--name", service]

    # Peers: each outbound cluster is another sidecar's inbound mTLS listener, pinned to its ID.
    for name, cluster in found.items():
        if name.startswith("peer_"):
            peer = name.removeprefix("peer_")
            assert endpoint(cluster) == {"socket_address": {"address": f"{peer}-sidecar", "port_value": 8443}}
            assert f"{peer}-sidecar" in svc
            inbound = listeners(envoy_config(peer))["inbound"]["address"]["socket_address"]
            assert inbound == {"address": "0.0.0.0", "port_value": 8443}

    # Only the frontend has a public door, and only it is published.
    public = listeners(config).get("public")
    if service == "frontend":
        assert public["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8000}
        assert sidecar["ports"] == ["8000:8000"]
    else:
        assert public is None and "ports" not in sidecar
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_upstream_app_command_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "authz_server.mesh.upstream", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--addr" in done.stdout and "--name" in done.stdout, done.stderr


# -- SPIRE ----------------------------------------------------------------------------------

def test_spire_entries_are_the_ids_the_policies_name() -> None:
    registered = {e["spiffe_id"] for e in entries()}
    assert len(registered) == len(entries()), "an entry is listed twice"
    data_text = (REPO / "policies" / "data.yaml").read_text()
    named_by_policies = {i for i in spiffe_ids_in(data_text) if i.startswith(f"spiffe://{TRUST_DOMAIN}/")}
    services_in_data = {f"spiffe://{TRUST_DOMAIN}/{s}" for s in yaml.safe_load(data_text)["services"]}
    sidecar_ids = {i for s in SERVICES for i in sds_names(envoy_config(s)) if i.startswith("spiffe://")}
    assert named_by_policies <= services_in_data == sidecar_ids
    assert registered == named_by_policies | sidecar_ids | {AUTHZ_ID}
    # authz-server admits exactly the sidecars' IDs, and its own ID is what sidecars pin.
    config = load_config(REPO / "deploy" / "compose" / "authz.yaml")
    assert config.tls is not None and set(config.tls.allowed_clients) == sidecar_ids
    assert set(config.sessions.settings.delegation_actors) <= registered


def test_spire_entries_select_on_labels_compose_sets() -> None:
    svc = services()
    parent = f"spiffe://{TRUST_DOMAIN}/spire/agent/x509pop/cn/spire-agent"
    labelled = {}
    for name, service in svc.items():
        for key, value in (service.get("labels") or {}).items():
            labelled.setdefault((key, value), []).append(name)
    for entry in entries():
        assert entry["parent_id"] == parent
        assert len(entry["selectors"]) == 1 and entry["selectors"][0]["type"] == "docker"
        key, value = entry["selectors"][0]["value"].removeprefix("label:").split(":", 1)
        holders = labelled.get((key, value), [])
        expected = ["authz-server-1", "authz-server-2"] if entry["spiffe_id"] == AUTHZ_ID else [f"{value}-sidecar"]
        assert sorted(holders) == expected, f"{entry['spiffe_id']}: label {key}={value} is on {holders}"


def test_spire_server_and_agent_configs_agree() -> None:
    server = (REPO / "spire" / "server" / "server.conf").read_text()
    agent = (REPO / "spire" / "agent" / "agent.conf").read_text()
    assert hcl_value(server, "trust_domain") == hcl_value(agent, "trust_domain") == TRUST_DOMAIN
    assert hcl_value(agent, "server_address") == "spire-server"
    assert hcl_value(agent, "server_port") == hcl_value(server, "bind_port")
    assert hcl_value(agent, "default_svid_name") == "default"
    assert hcl_value(agent, "default_bundle_name") == "ROOTCA"
    assert hcl_value(agent, "default_all_bundles_name") == "ALL"
    assert "insecure_bootstrap" not in agent
    # The agent's ID the entries name as parent follows from the template and the bootstrap CN.
    template = hcl_value(server, "agent_path_template")
    sys.path.insert(0, str(REPO / "deploy" / "compose"))
    try:
        import bootstrap_pki
    finally:
        sys.path.pop(0)
    agent_path = template.replace("{{ .Subject.CommonName }}", bootstrap_pki.AGENT_CN)
    assert f"spiffe://{TRUST_DOMAIN}/spire/agent{agent_path}" == entries()[0]["parent_id"]
    # The files the configs read are the ones bootstrap writes, on the volume mounted there.
    svc = services()
    written = {"upstream-ca.pem", "upstream-ca.key", "agent-ca.pem", "agent.pem", "agent.key"}
    for text, service in ((server, "spire-server"), (agent, "spire-agent")):
        for path in re.findall(r'"(/etc/spire/bootstrap/[^"]+)"', text):
            assert os.path.basename(path) in written, path
            assert mount_source(svc[service], path) == "spire-bootstrap"
    assert mount_source(svc["bootstrap"], "/bootstrap/spire") == "spire-bootstrap"
    socket = hcl_value(server, "socket_path")
    assert mount_source(svc["spire-server"], socket) == mount_source(svc["spire-entries"], socket) == "spire-server-socket"
    assert socket in svc["spire-server"]["healthcheck"]["test"]
    assert f'SPIRE_SERVER_SOCKET:-{socket}' in (REPO / "spire" / "entries.sh").read_text()


def _hcl_block(text: str, start: str) -> str:
    """The body of the HCL block that opens with ``start`` (braces balanced)."""
    begin = text.index(start)
    depth, index = 0, text.index("{", begin)
    for index in range(index, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[text.index("{", begin) + 1:index]
    raise AssertionError(f"unbalanced block {start}")


def test_spire_and_the_partner_issuer_federate_over_bundle_endpoints() -> None:
    """SPIRE's federation block and the partner.org issuer's config name each other's bundle
    endpoints (https_web), with certificates the bootstrap makes for those host names, served
    from the volume both mount, and trusted by the other side."""
    from urllib.parse import urlsplit

    svc = services()
    server = (REPO / "spire" / "server" / "server.conf").read_text()
    federation = _hcl_block(server, "federation {")
    endpoint = _hcl_block(federation, "bundle_endpoint {")
    assert 'profile "https_web"' in endpoint
    spire_port = int(re.search(r"^\s*port = (\d+)", endpoint, flags=re.MULTILINE).group(1))
    cert_paths = re.findall(r'(?:cert|key)_file_path = "([^"]+)"', endpoint)
    partner = _hcl_block(federation, 'federates_with "partner.org" {')
    assert 'bundle_endpoint_profile "https_web"' in partner
    partner_url = urlsplit(re.search(r'bundle_endpoint_url = "([^"]+)"', partner).group(1))

    issuer = yaml.safe_load((REPO / "deploy" / "compose" / "partner-issuer.yaml").read_text())
    assert [d["name"] for d in issuer["trust_domains"]] == ["partner.org"]
    (remote,) = issuer["trust_domains"][0]["federates_with"]
    spire_url = urlsplit(remote["bundle_endpoint_url"])
    assert remote["trust_domain"] == TRUST_DOMAIN and remote["profile"] == "https_web"
    assert (spire_url.scheme, spire_url.hostname, spire_url.port) == ("https", "spire-server", spire_port)
    issuer_port = int(issuer["bundle_endpoint"]["addr"].rpartition(":")[2])
    assert (partner_url.scheme, partner_url.hostname, partner_url.port, partner_url.path) == (
        "https", "partner-issuer", issuer_port, "/partner.org")
    assert svc["partner-issuer"]["command"][:2] == ["identity", "serve"]
    assert mount_source(svc["partner-issuer"], svc["partner-issuer"]["command"][-1]) == \
        "./deploy/compose/partner-issuer.yaml"

    # Certificates: made by the bootstrap for each host name, on the volume both mount.
    sys.path.insert(0, str(REPO / "deploy" / "compose"))
    try:
        import bootstrap_pki
    finally:
        sys.path.pop(0)
    hosts = {stem: host for stem, (host, _uid) in bootstrap_pki.BUNDLE_ENDPOINTS.items()}
    assert hosts == {"spire-bundle": "spire-server", "partner-bundle": "partner-issuer"}
    for service, paths in (("spire-server", cert_paths),
                           ("partner-issuer", [issuer["bundle_endpoint"]["cert_file"],
                                               issuer["bundle_endpoint"]["key_file"], remote["ca_file"]])):
        for path in paths:
            assert mount_source(svc[service], path) == "keycloak-tls", (service, path)
    assert {os.path.basename(p) for p in cert_paths} == {"spire-bundle.pem", "spire-bundle.key"}
    assert {os.path.basename(issuer["bundle_endpoint"][k]) for k in ("cert_file", "key_file")} == \
        {"partner-bundle.pem", "partner-bundle.key"}
    # SPIRE's https_web client trusts the system's CAs: SSL_CERT_FILE makes that the demo Web PKI.
    assert svc["spire-server"]["environment"]["SSL_CERT_FILE"] == remote["ca_file"]
    # The dev issuer's own loader accepts it (the files it names exist only inside the container:
    # any readable file stands in for them here).
    from authz_server.workload.config import IdentityConfig

    stand_in = str(REPO / "README.md")
    issuer["bundle_endpoint"].update(cert_file=stand_in, key_file=stand_in)
    remote["ca_file"] = stand_in
    parsed = IdentityConfig.from_mapping(issuer)
    assert parsed.remote_partners[0].trust_domain == TRUST_DOMAIN and parsed.bundle_endpoint is not None


def _fake_spire_server(tmp_path: Path, answer: dict[str, Any]) -> Path:
    fake = tmp_path / "spire-server"
    fake.write_text("#!/bin/sh\n"
                    'case "$1" in\n'
                    "  healthcheck) exit 0 ;;\n"
                    f"  entry) if [ \"$2\" = create ]; then echo '{json.dumps(answer)}'; fi; exit 0 ;;\n"
                    "esac\n"
                    "exit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return fake


@pytest.mark.parametrize(("codes", "ok"), [((0, 0, 0, 0), True), ((6, 6, 0, 6), True), ((0, 3, 6, 0), False),
                                           ((), False)])
def test_entries_script_is_idempotent_and_strict(tmp_path: Path, codes: tuple[int, ...], ok: bool) -> None:
    answer = {"results": [{"status": {"code": c, "message": "m"}, "entry": {"spiffe_id": "x"}} for c in codes]}
    fake = _fake_spire_server(tmp_path, answer)
    done = subprocess.run(["sh", str(REPO / "spire" / "entries.sh"), str(REPO / "spire" / "entries.json")],
                          env={**os.environ, "SPIRE_SERVER_BIN": str(fake)}, capture_output=True, text=True,
                          timeout=30)
    assert (done.returncode == 0) is ok, done.stdout + done.stderr


def test_bootstrap_makes_working_key_material(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    script = REPO / "deploy" / "compose" / "bootstrap_pki.py"
    args = [sys.executable, str(script), "--spire", str(tmp_path / "spire"), "--keycloak", str(tmp_path / "kc"),
            "--no-chown"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    snapshot = {p.name: p.read_bytes() for p in (tmp_path / "spire").iterdir()}
    second = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "kept" in second.stdout
    assert snapshot == {p.name: p.read_bytes() for p in (tmp_path / "spire").iterdir()}, "a second start re-made keys"

    def load(path: Path) -> x509.Certificate:
        return x509.load_pem_x509_certificate(path.read_bytes())

    agent, agent_ca = load(tmp_path / "spire" / "agent.pem"), load(tmp_path / "spire" / "agent-ca.pem")
    agent.verify_directly_issued_by(agent_ca)
    assert agent.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "spire-agent"
    assert agent.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    upstream = load(tmp_path / "spire" / "upstream-ca.pem")
    assert upstream.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = upstream.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TRUST_DOMAIN}"]
    tls = load(tmp_path / "kc" / "tls.pem")
    tls.verify_directly_issued_by(load(tmp_path / "kc" / "ca.pem"))
    names = tls.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"keycloak", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    for stem, host in (("spire-bundle", "spire-server"), ("partner-bundle", "partner-issuer")):
        endpoint = load(tmp_path / "kc" / f"{stem}.pem")  # the bundle endpoints' Web PKI certificates
        endpoint.verify_directly_issued_by(load(tmp_path / "kc" / "ca.pem"))
        sans = endpoint.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == [host]
        assert stat.S_IMODE((tmp_path / "kc" / f"{stem}.key").stat().st_mode) == 0o600
    for key in (tmp_path / "spire").glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


# -- Keycloak and the issuer ----------------------------------------------------------------

def test_keycloak_realm_has_the_demo_users_and_clients() -> None:
    realm = json.loads((REPO / "deploy" / "keycloak" / "realm-demo.json").read_text())
    assert realm["realm"] == "demo" and realm["enabled"] and realm["sslRequired"] == "all"
    users = {u["username"]: u for u in realm["users"]}
    assert users["alice"]["realmRoles"] == ["customer"] and users["bob"]["realmRoles"] == ["support"]
    for name in ("alice", "bob"):
        user = users[name]
        assert user["enabled"] and user["credentials"][0]["value"] == f"{name}-password"
        assert user["email"] and user["firstName"] and user["lastName"], "an incomplete profile blocks the password grant"
    assert {r["name"] for r in realm["roles"]["realm"]} == {"customer", "support"}
    clients = {c["clientId"]: c for c in realm["clients"]}
    assert clients["web"]["directAccessGrantsEnabled"] and clients["web"]["secret"] == "web-secret"
    assert clients["reports"]["serviceAccountsEnabled"]

    issuer = load_config(REPO / "deploy" / "compose" / "authz.yaml").issuers[0]
    for client in clients.values():
        assert not client["publicClient"]
        mappers = {m["protocolMapper"]: m["config"] for m in client["protocolMappers"]}
        audience = mappers["oidc-audience-mapper"]["included.custom.audience"]
        assert audience in issuer.audiences and mappers["oidc-audience-mapper"]["access.token.claim"] == "true"
        assert mappers["oidc-hardcoded-claim-mapper"]["claim.name"] == "client_id"
        assert mappers["oidc-hardcoded-claim-mapper"]["claim.value"] == client["clientId"]
        assert "oidc-sub-mapper" in mappers
        # typ: at+jwt in the authz config only works if Keycloak writes it (RFC 9068 client setting).
        assert client["attributes"]["access.token.header.type.rfc9068"] == "true"
        assert client["attributes"]["access.token.signed.response.alg"] in issuer.algorithms
    assert issuer.typ == "at+jwt"


def test_compose_issuer_is_keycloaks_realm_over_https() -> None:
    svc = services()
    keycloak = svc["keycloak"]
    env = keycloak["environment"]
    issuer = load_config(REPO / "deploy" / "compose" / "authz.yaml").issuers[0]
    realm = json.loads((REPO / "deploy" / "keycloak" / "realm-demo.json").read_text())["realm"]
    assert issuer.issuer == f"{env['KC_HOSTNAME']}/realms/{realm}"
    assert issuer.issuer.startswith("https://keycloak:8443/")
    assert "--import-realm" in keycloak["command"]
    assert mount_source(keycloak, "/opt/keycloak/data/import/realm-demo.json") == "./deploy/keycloak/realm-demo.json"
    assert mount_source(keycloak, env["KC_HTTPS_CERTIFICATE_FILE"]) == "keycloak-tls"
    assert issuer.ca_file is not None and mount_source(svc["authz-server-1"], issuer.ca_file) == "keycloak-tls"
    assert os.path.basename(issuer.ca_file) == "ca.pem"
    assert mount_source(svc["bootstrap"], "/bootstrap/keycloak") == "keycloak-tls"


# -- authz-server configs -------------------------------------------------------------------

def test_compose_authz_config_loads_and_fits_the_compose_file() -> None:
    """Loaded with the project's loader. Not checked here: that the Workload API, Redis and
    Keycloak answer, and the files it names inside the containers (/etc/authz/policies,
    /etc/keycloak-tls/ca.pem): those exist only once the stack runs."""
    svc = services()
    replica = svc["authz-server-1"]
    assert replica["command"] == ["serve", "--config", "/etc/authz/config.yaml"]
    assert mount_source(replica, "/etc/authz/config.yaml") == "./deploy/compose/authz.yaml"
    config = load_config(REPO / "deploy" / "compose" / "authz.yaml")
    assert config.addr == "0.0.0.0:9191"
    assert mount_source(replica, config.policies) == "./policies"
    assert config.tls is not None and config.tls.spiffe_socket == f"unix://{AGENT_SOCKET}"
    assert config.trust_domains == (TRUST_DOMAIN,)
    for store in (config.sessions.store, config.signals.rate_store if config.signals else ""):
        assert re.fullmatch(r"redis://redis:6379/\d+", store), store
    assert "redis" in svc
    assert config.audit == ("stdout",)
    port = int(config.metrics_addr.rpartition(":")[2])
    assert f":{port}/metrics" in " ".join(replica["healthcheck"]["test"])
    assert svc["authz-server-2"] == replica


def test_kubernetes_authz_config_loads_and_fits_the_deployment() -> None:
    config = load_config(K8S / "authz-server" / "config.yaml")
    deployment = next(d for _p, d in k8s_documents() if d["kind"] == "Deployment"
                      and d["metadata"]["name"] == "authz-server")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["serve", "--config", "/etc/authz/config.yaml"]
    mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounted["/etc/authz/config.yaml"]]["configMap"]["name"] == "authz-server-config"
    assert volumes[mounted[config.policies]]["configMap"]["name"] == "authz-server-policies"
    # One worker per core: the config's workers equal the CPU limit, and requests = limits.
    assert config.workers == int(container["resources"]["limits"]["cpu"])
    assert container["resources"]["requests"] == {**container["resources"]["requests"],
                                                  "cpu": container["resources"]["limits"]["cpu"]}
    port = int(config.addr.rpartition(":")[2])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port
    # Plain gRPC inside the pod (the kubelet's gRPC probes carry no TLS); the mesh does mTLS.
    assert config.tls is None
    assert volumes["workload-socket"]["csi"] == {"driver": "csi.spiffe.io", "readOnly": True}
    assert deployment["spec"]["template"]["metadata"]["annotations"]["inject.istio.io/templates"] == "sidecar,spire"
    # Every shared state on the Sentinel-watched Redis of redis.yaml, each in its own database.
    stores = [config.sessions.store, config.signals.rate_store, config.signals.anomaly_store]
    locations = [parse_store_url(store, key="store") for store in stores]
    sentinels = tuple((f"redis-{n}.redis-headless.authz-system.svc.cluster.local", 26379) for n in range(3))
    assert all(loc.kind == "sentinel" and loc.nodes == sentinels and loc.service == "authz" for loc in locations)
    assert sorted(loc.db for loc in locations) == [0, 1, 2] and locations[0].replica_acks == 1
    # Draining: the preStop hook sends SIGUSR1 (NOT_SERVING, still answering) and waits; SIGTERM
    # then finishes the checks in flight, all within the grace period, the sidecar outliving it.
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sh", "-c", "kill -USR1 1 && sleep 5"]
    pre_stop = 5
    assert config.shutdown.drain_delay <= pre_stop
    assert pre_stop + config.shutdown.grace < pod["terminationGracePeriodSeconds"]
    proxy = json.loads(deployment["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"])
    assert float(proxy["terminationDrainDuration"].removesuffix("s")) >= pre_stop + config.shutdown.grace
    assert container["readinessProbe"]["grpc"] == {"port": port}  # NOT_SERVING takes the pod out
    assert config.issuers and config.issuers[0].issuer.startswith("https://")
    assert config.sessions.settings.delegation_actors == (f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/frontend",)


def test_kubernetes_policies_are_the_repositorys_in_istio_form() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_policies", K8S / "sync-policies.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = module.expected_files()
    present = {p.name: p.read_text() for p in (K8S / "policies").iterdir()}
    assert present == expected, "deploy/kubernetes/policies/ is stale: python deploy/kubernetes/sync-policies.py"
    assert f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/frontend" in present["data.yaml"]
    done = subprocess.run([sys.executable, "-m", "authz_server.cli", "policy", "test", str(K8S / "policies")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "PASS:" in done.stdout, done.stdout + done.stderr


# -- Dockerfile -----------------------------------------------------------------------------

def test_dockerfile_builds_from_sources_that_exist_and_runs_unprivileged() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", text, flags=re.MULTILINE)[0] == "python:3.11-slim"
    assert re.findall(r"^FROM (\S+)", text, flags=re.MULTILINE)[-1] == "python:3.11-slim"
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.MULTILINE):
        for item in source.split():
            assert (REPO / item).exists(), f"COPY {item}: missing"
    build_stage = text.split("\nFROM ")[1]
    assert re.search(r"apt-get install .*\bgcc\b", build_stage), "the wheel would lack the C extension (gRPC repeats)"
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not ignored & {"authz_server", "protos", "pyproject.toml", "setup.py", "README.md"}


# -- YAML lint ------------------------------------------------------------------------------

def test_yaml_files_pass_yamllint() -> None:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(REPO / ".yamllint"))
    files = [COMPOSE_FILE, *sorted((REPO / "deploy").rglob("*.yaml")), *sorted((REPO / "deploy").rglob("*.yml"))]
    problems = []
    for path in files:
        for problem in linter.run(path.read_text(), config, str(path)):
            problems.append(f"{path.relative_to(REPO)}:{problem.line}:{problem.column}: {problem.level}: "
                            f"{problem.message} ({problem.rule})")
    assert not problems, "\n".join(problems)


# -- Kubernetes -----------------------------------------------------------------------------

def test_kubernetes_manifests_validate_against_1_31() -> None:
    import kubernetes_validate

    checked = 0
    for path, doc in k8s_documents():
        group = doc["apiVersion"].split("/")[0]
        if group in ISTIO_GROUPS:
            continue  # not in kubernetes-validate's schemas: test_istio_resources_by_hand
        try:
            kubernetes_validate.validate(doc, "1.31", strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(REPO)}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")
        checked += 1
    assert checked >= 15


def test_kustomization_lists_every_manifest_and_builds() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    manifests = {p.relative_to(K8S).as_posix() for p, _d in k8s_documents()} - {"istio/istio-operator.yaml"}
    assert listed == manifests
    for generator in kustomization["configMapGenerator"]:
        for entry in generator["files"]:
            assert (K8S / entry.split("=")[-1]).is_file(), entry
    generated = {g["name"] for g in kustomization["configMapGenerator"]}
    assert generated == {"authz-server-config", "authz-server-policies"}
    policy_files = {e.split("/")[-1] for g in kustomization["configMapGenerator"] if g["name"] == "authz-server-policies"
                    for e in g["files"]}
    assert policy_files == {p.name for p in (K8S / "policies").iterdir()}

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return  # the build itself needs kustomize (kubectl kustomize); the rest is checked above
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import kubernetes_validate

    built = [d for d in yaml.safe_load_all(done.stdout) if d]
    for doc in built:
        if doc["apiVersion"].split("/")[0] not in ISTIO_GROUPS:
            kubernetes_validate.validate(doc, "1.31", strict=True)
    config_maps = {d["metadata"]["name"] for d in built if d["kind"] == "ConfigMap"}
    deployment = next(d for d in built if d["kind"] == "Deployment" and d["metadata"]["name"] == "authz-server")
    referenced = {v["configMap"]["name"] for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v}
    assert referenced and referenced <= config_maps
    config = next(d for d in built if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("authz-server-config"))
    assert config["data"]["config.yaml"] == (K8S / "authz-server" / "config.yaml").read_text()


def test_kubernetes_workloads_line_up() -> None:
    docs = [d for _p, d in k8s_documents()]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    namespaces = {d["metadata"]["name"] for d in by_kind["Namespace"]}
    for doc in docs:
        if doc["kind"] not in {"Namespace", "IstioOperator"}:
            assert doc["metadata"]["namespace"] in namespaces, doc["metadata"]["name"]
    workloads = {(d["metadata"]["namespace"], d["metadata"]["name"]): d
                 for d in by_kind["Deployment"] + by_kind["StatefulSet"]}
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in by_kind["ServiceAccount"]}
    for (namespace, name), workload in workloads.items():
        template = workload["spec"]["template"]
        assert (namespace, template["spec"]["serviceAccountName"]) in accounts
        assert workload["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        assert template["metadata"]["annotations"]["inject.istio.io/templates"] == "sidecar,spire"
        assert {"name": "workload-socket", "csi": {"driver": "csi.spiffe.io", "readOnly": True}} in \
            template["spec"]["volumes"]
    for service in by_kind["Service"]:
        namespace = service["metadata"]["namespace"]
        selected = [w for (ns, _n), w in workloads.items() if ns == namespace and service["spec"]["selector"].items()
                    <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, f"service {service['metadata']['name']} selects {len(selected)} workloads"
        port_names = {p["name"] for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
    (hpa_doc,) = by_kind["HorizontalPodAutoscaler"]
    hpa = hpa_doc["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "authz-server"}
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    # A budget for each replicated workload: drains and upgrades take one pod at a time.
    budgets = {d["metadata"]["name"]: d["spec"] for d in by_kind["PodDisruptionBudget"]}
    assert set(budgets) == {"authz-server", "redis"}
    for name, budget in budgets.items():
        workload = workloads[("authz-system", name)]
        assert budget["selector"]["matchLabels"] == workload["spec"]["selector"]["matchLabels"]
        assert budget["maxUnavailable"] == 1
    assert budgets["authz-server"]["maxUnavailable"] < hpa["minReplicas"]


def _check_keys(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(obj) - allowed
    assert not unknown, f"{where}: unknown keys {sorted(unknown)}"


def test_istio_resources_by_hand() -> None:
    """kubernetes-validate has no schemas for Istio's CRDs: apiVersion, kind and the fields
    Istio requires are checked here against Istio's API (security/v1, networking/v1,
    networking/v1alpha3 EnvoyFilter, install.istio.io/v1alpha1 IstioOperator)."""
    docs = [d for _p, d in k8s_documents()]
    services_by_name = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs if d["kind"] == "Service"}
    operator = istio_operator()
    assert operator["apiVersion"] == "install.istio.io/v1alpha1" and operator["kind"] == "IstioOperator"
    mesh = operator["spec"]["meshConfig"]
    assert mesh["trustDomain"] == TRUST_DOMAIN
    assert mesh["defaultConfig"]["proxyMetadata"]["WORKLOAD_IDENTITY_SOCKET_FILE"] == "spire-agent.sock"
    providers = {p["name"]: p for p in mesh["extensionProviders"]}
    grpc = providers["authz-server"]["envoyExtAuthzGrpc"]
    # MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationGrpcProvider's fields.
    _check_keys(grpc, {"service", "port", "timeout", "failOpen", "clearRouteCache", "statusOnError",
                       "includeRequestBodyInCheck"}, "envoyExtAuthzGrpc")
    _check_keys(grpc["includeRequestBodyInCheck"], {"maxRequestBytes", "allowPartialMessage", "packAsBytes"},
                "includeRequestBodyInCheck")
    name, namespace = grpc["service"].removesuffix(".svc.cluster.local").split(".")
    service = services_by_name[(namespace, name)]
    assert grpc["port"] in {p["port"] for p in service["spec"]["ports"] if p["name"].startswith("grpc")}
    assert grpc["failOpen"] is False and grpc["statusOnError"] == "403"
    assert "spire" in operator["spec"]["values"]["sidecarInjectorWebhook"]["templates"]

    seen: set[str] = set()
    for doc in docs:
        api, kind = doc["apiVersion"], doc["kind"]
        group = api.split("/")[0]
        if group not in ISTIO_GROUPS or kind == "IstioOperator":  # the operator: checked above
            continue
        seen.add(kind)
        assert doc["metadata"]["name"] and doc["metadata"].get("namespace")
        spec = doc["spec"]
        if kind == "AuthorizationPolicy":
            assert api == "security.istio.io/v1"
            _check_keys(spec, {"selector", "targetRef", "targetRefs", "rules", "action", "provider"}, kind)
            assert spec["action"] in {"ALLOW", "DENY", "AUDIT", "CUSTOM"}
            if spec["action"] == "CUSTOM":
                assert spec["provider"]["name"] in providers, "CUSTOM must name a meshConfig extension provider"
            else:
                assert "provider" not in spec
            for rule in spec["rules"]:
                _check_keys(rule, {"from", "to", "when"}, f"{kind} rule")
        elif kind == "PeerAuthentication":
            assert api == "security.istio.io/v1"
            assert spec["mtls"]["mode"] == "STRICT"
        elif kind == "EnvoyFilter":
            assert api == "networking.istio.io/v1alpha3"
            for patch in spec["configPatches"]:
                assert patch["applyTo"] == "VIRTUAL_HOST"
                assert patch["match"]["context"] == "SIDECAR_INBOUND"
                assert patch["patch"]["operation"] == "MERGE"
                per_route = patch["patch"]["value"]["typed_per_filter_config"]["envoy.filters.http.ext_authz"]
                assert per_route["@type"].endswith("envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute")
        elif kind == "DestinationRule":
            assert api == "networking.istio.io/v1"
            _check_keys(spec, {"host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"}, kind)
            name, namespace = spec["host"].removesuffix(".svc.cluster.local").split(".")
            assert (namespace, name) in services_by_name
            assert spec["host"] == grpc["service"], "the rule is for the ext_authz provider's service"
            _check_keys(spec["trafficPolicy"]["outlierDetection"], {
                "consecutiveGatewayErrors", "consecutive5xxErrors", "interval", "baseEjectionTime",
                "maxEjectionPercent", "minHealthPercent", "splitExternalLocalOriginErrors",
                "consecutiveLocalOriginFailures"}, "outlierDetection")
        elif kind == "Gateway":
            assert api == "networking.istio.io/v1"
            assert spec["selector"] == {"istio": "ingressgateway"} and spec["servers"]
        elif kind == "VirtualService":
            assert api == "networking.istio.io/v1"
            gateways = {d["metadata"]["name"] for d in docs if d["kind"] == "Gateway"}
            assert set(spec["gateways"]) <= gateways
            for route in spec["http"]:
                for destination in route["route"]:
                    host, port = destination["destination"]["host"], destination["destination"]["port"]["number"]
                    name, namespace = host.removesuffix(".svc.cluster.local").split(".")
                    assert port in {p["port"] for p in services_by_name[(namespace, name)]["spec"]["ports"]}
        else:
            pytest.fail(f"unexpected Istio kind {kind}")
    assert seen == {"AuthorizationPolicy", "PeerAuthentication", "EnvoyFilter", "Gateway", "VirtualService",
                    "DestinationRule"}


def test_istio_route_settings_follow_the_policy_data() -> None:
    """Each demo service's EnvoyFilter names it and the strongest sensitivity of its routes."""
    data = yaml.safe_load((REPO / "policies" / "data.yaml").read_text())
    order = ["low", "medium", "high"]
    filters = {d["spec"]["workloadSelector"]["labels"]["app"]: d for _p, d in k8s_documents()
               if d["kind"] == "EnvoyFilter"}
    assert set(filters) == set(data["services"]) == set(SERVICES)
    for service, spec in data["services"].items():
        strongest = max((r.get("sensitivity", "medium") for r in spec["routes"]), key=order.index)
        (patch,) = filters[service]["spec"]["configPatches"]
        context = patch["patch"]["value"]["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"]
        assert context["context_extensions"] == {"service": service, "sensitivity": strongest}
        assert patch["match"]["routeConfiguration"]["vhost"]["name"] == "inbound|http|8080"
    apps = {d["metadata"]["name"]: d for _p, d in k8s_documents() if d["kind"] == "Deployment"
            and d["metadata"]["namespace"] == "demo"}
    for service in SERVICES:
        container = apps[service]["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["--addr", "0.0.0.0:8080", "--name", service]
        assert apps[service]["spec"]["template"]["metadata"]["labels"]["app"] == service


def test_spire_helm_values_pin_the_trust_domain() -> None:
    values = yaml.safe_load((K8S / "spire" / "values.yaml").read_text())
    assert values["global"]["spire"]["trustDomain"] == TRUST_DOMAIN
    template = values["spire-server"]["controllerManager"]["identities"]["clusterSPIFFEIDs"]["default"]
    assert template["spiffeIDTemplate"].endswith("/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}")
    text = (K8S / "spire" / "values.yaml").read_text()
    assert "--version 0.30.0" in text and "--version 0.6.0" in text
    docs = (REPO / "docs" / "deploy.md").read_text()
    assert "0.30.0" in docs and "0.6.0" in docs


# -- Redis with Sentinel ----------------------------------------------------------------------

HEADLESS = "redis-headless.authz-system.svc.cluster.local"


def _redis_scripts(tmp_path: Path, sentinels_say: str) -> Path:
    """redis.yaml's scripts, runnable here: their paths moved under tmp_path, with a fake
    redis-cli (answering what the sentinels say) and a fake redis-server (printing its args)."""
    (config_map,) = [d for _p, d in k8s_documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] ==
                     "redis-scripts"]
    for folder in ("scripts", "sentinel", "bin"):
        (tmp_path / folder).mkdir(exist_ok=True)
    for name, text in config_map["data"].items():
        (tmp_path / "scripts" / name).write_text(text.replace("/scripts/", f"{tmp_path}/scripts/")
                                                 .replace("/sentinel/", f"{tmp_path}/sentinel/"))
    answer = f"printf '%s\\n' {sentinels_say} 6379" if sentinels_say else "exit 1"
    (tmp_path / "bin" / "redis-cli").write_text(f"#!/bin/sh\n{answer}\n")
    (tmp_path / "bin" / "redis-server").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    for fake in (tmp_path / "bin").iterdir():
        fake.chmod(0o755)
    return tmp_path


@pytest.mark.parametrize(("pod", "sentinels_say", "replica_of"), [
    ("redis-0", "", None),  # the very first start: nobody answers, redis-0 begins as primary
    ("redis-1", "", f"redis-0.{HEADLESS}"),
    ("redis-0", f"redis-2.{HEADLESS}", f"redis-2.{HEADLESS}"),  # back after a failover: a replica now
    ("redis-2", f"redis-2.{HEADLESS}", None),  # the primary the sentinels name, restarted
])
def test_redis_pods_start_as_the_sentinels_say(tmp_path: Path, pod: str, sentinels_say: str,
                                               replica_of: str | None) -> None:
    folder = _redis_scripts(tmp_path, sentinels_say)
    env = {**os.environ, "POD_NAME": pod, "PATH": f"{folder}/bin:{os.environ['PATH']}"}
    done = subprocess.run(["sh", str(folder / "scripts" / "redis.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    args = done.stdout.split("\n")
    assert args[args.index("--replica-announce-ip") + 1] == f"{pod}.{HEADLESS}"
    if replica_of is None:
        assert "--replicaof" not in args
    else:
        assert args[args.index("--replicaof") + 1:args.index("--replicaof") + 3] == [replica_of, "6379"]

    done = subprocess.run(["sh", str(folder / "scripts" / "sentinel.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.split() == [f"{folder}/sentinel/sentinel.conf", "--sentinel"]
    conf = (folder / "sentinel" / "sentinel.conf").read_text().splitlines()
    primary = replica_of or f"{pod}.{HEADLESS}"
    assert f"sentinel monitor authz {primary} 6379 2" in conf and f"sentinel announce-ip {pod}.{HEADLESS}" in conf


def test_redis_group_and_authz_config_agree() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for _p, d in k8s_documents()}
    redis = docs[("StatefulSet", "redis")]["spec"]
    headless = docs[("Service", "redis-headless")]["spec"]
    assert redis["serviceName"] == "redis-headless" and headless["clusterIP"] == "None"
    assert headless["publishNotReadyAddresses"] is True  # sentinels find each other before ready
    scripts = docs[("ConfigMap", "redis-scripts")]["data"]
    quorum = int(re.search(r"sentinel monitor authz \S+ 6379 (\d+)", scripts["sentinel.sh"]).group(1))
    assert redis["replicas"] == 3 and quorum == 2, "a majority of three sentinels must agree to fail over"
    assert all(f"redis-{n}" in scripts["primary.sh"] or "0 1 2" in scripts["primary.sh"] for n in range(3))
    ports = {p["name"]: p["containerPort"] for c in redis["template"]["spec"]["containers"] for p in c["ports"]}
    assert ports == {"tcp-redis": 6379, "tcp-sentinel": 26379}
    config = load_config(K8S / "authz-server" / "config.yaml")
    location = parse_store_url(config.sessions.store, key="sessions.store")
    assert location.service == "authz" and {port for _h, port in location.nodes} == {ports["tcp-sentinel"]}
    allowed = docs[("AuthorizationPolicy", "redis-clients")]["spec"]["rules"][0]
    assert set(allowed["to"][0]["operation"]["ports"]) == {str(p) for p in ports.values()}
    assert "example.org/ns/authz-system/sa/redis" in allowed["from"][0]["source"]["principals"]
    for name, text in scripts.items():
        done = subprocess.run(["sh", "-n"], input=text, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{name}: {done.stderr}"
