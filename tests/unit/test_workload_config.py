"""The dev issuer's config: defaults, paths relative to the file, and one clear error per mistake,
naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from authz_server.errors import ConfigError
from authz_server.workload import IdentityConfig


def base(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "trust_domains": [{"name": "example.org", "federates_with": ["partner.org"]}, {"name": "partner.org"}],
        "workloads": [{"name": "frontend", "spiffe_id": "spiffe://example.org/frontend", "socket": "run/f.sock"}],
    }
    data.update(overrides)
    return data


def test_defaults_and_design_example(tmp_path: Path) -> None:
    config_file = tmp_path / "conf" / "identity.yaml"
    config_file.parent.mkdir()
    config_file.write_text("""
state_dir: .authz/identity
svid_ttl: 1h
trust_domains:
  - name: example.org
    federates_with: [partner.org]
  - name: partner.org
workloads:
  - name: frontend
    spiffe_id: spiffe://example.org/frontend
    socket: run/frontend.sock
""")
    config = IdentityConfig.from_yaml(config_file)
    assert config.svid_ttl == 3600.0
    assert config.jwt_svid_ttl == 300.0
    assert config.ca_ttl == 86400.0
    assert config.jwt_algorithm == "ES256"
    assert config.ready_file is None
    # relative paths are read relative to the config file's directory
    assert config.state_dir == str(config_file.parent / ".authz/identity")
    assert config.workloads[0].socket == str(config_file.parent / "run/frontend.sock")
    assert config.trust_domain("example.org").federates_with == ("partner.org",)
    assert config.trust_domain("example.org").id == "spiffe://example.org"
    assert config.workload("frontend").trust_domain == "example.org"


def test_dns_names_are_optional_and_lowercased(tmp_path: Path) -> None:
    workload = {"name": "f", "spiffe_id": "spiffe://example.org/f", "socket": "f.sock",
                "dns_names": ["Authz-Server", "authz.mesh.local"]}
    config = IdentityConfig.from_dict(base(workloads=[workload]), base_dir=tmp_path)
    assert config.workload("f").dns_names == ("authz-server", "authz.mesh.local")
    assert IdentityConfig.from_dict(base(), base_dir=tmp_path).workload("frontend").dns_names == ()


def test_short_ttls_are_accepted(tmp_path: Path) -> None:
    assert IdentityConfig.from_mapping(base(svid_ttl="20s"), base_dir=tmp_path).svid_ttl == 20.0
    config = IdentityConfig.from_dict(base(svid_ttl="20s", ca_ttl="10m", ca_publish_ahead="5s"), base_dir=tmp_path)
    assert (config.svid_ttl, config.ca_ttl, config.ca_publish_ahead) == (20.0, 600.0, 5.0)


@pytest.mark.parametrize(("overrides", "key", "fragment"), [
    ({"svid_tll": "1h"}, "svid_tll", "unknown key"),
    ({"svid_ttl": "soon"}, "svid_ttl", "expected a duration"),
    ({"svid_ttl": "1s"}, "svid_ttl", "at least 2s"),
    ({"svid_ttl": "1h", "ca_ttl": "90m"}, "ca_ttl", "twice svid_ttl"),
    ({"ca_publish_ahead": "13h"}, "ca_publish_ahead", "half of ca_ttl"),
    ({"jwt_svid_ttl": 0}, "jwt_svid_ttl", "at least 1s"),
    ({"jwt_algorithm": "HS256"}, "jwt_algorithm", "ES256, RS256"),
    ({"bundle_refresh_hint": "0s"}, "bundle_refresh_hint", "at least 1s"),
    ({"state_dir": ""}, "state_dir", "non-empty string"),
    ({"trust_domains": []}, "trust_domains", "non-empty list"),
    ({"trust_domains": ["example.org"]}, "trust_domains[0]", "mapping"),
    ({"trust_domains": [{"name": "Example.org"}]}, "trust_domains[0].name", "not a trust domain name"),
    ({"trust_domains": [{"name": "spiffe://example.org"}]}, "trust_domains[0].name", "without the scheme"),
    ({"trust_domains": [{"name": "example.org"}, {"name": "example.org"}]}, "trust_domains[1].name", "twice"),
    ({"trust_domains": [{"name": "example.org", "federates_with": ["other.org"]}]},
     "trust_domains[0].federates_with[0]", "not one of the configured"),
    ({"trust_domains": [{"name": "example.org", "federates_with": ["example.org"]}]},
     "trust_domains[0].federates_with[0]", "itself"),
    ({"trust_domains": [{"name": "example.org", "federates_with": "partner.org"}, {"name": "partner.org"}]},
     "trust_domains[0].federates_with", "list"),
    ({"trust_domains": [{"name": "example.org", "bundle_url": "x"}]}, "trust_domains[0].bundle_url", "unknown key"),
    ({"workloads": []}, "workloads", "non-empty list"),
    ({"workloads": [{"name": "f", "spiffe_id": "https://example.org/f", "socket": "f.sock"}]},
     "workloads[0].spiffe_id", "SPIFFE ID"),
    ({"workloads": [{"name": "f", "spiffe_id": "spiffe://example.org", "socket": "f.sock"}]},
     "workloads[0].spiffe_id", "add a path"),
    ({"workloads": [{"name": "f", "spiffe_id": "spiffe://elsewhere.org/f", "socket": "f.sock"}]},
     "workloads[0].spiffe_id", "not one of the configured"),
    ({"workloads": [{"name": "f", "spiffe_id": "spiffe://example.org/f"}]}, "workloads[0].socket", "non-empty"),
    ({"workloads": [{"name": "f", "spiffe_id": "spiffe://example.org/f", "socket": "s/" + "x" * 120}]},
     "workloads[0].socket", "at most 107"),
    ({"workloads": [{"name": "f", "spiffe_id": "spiffe://example.org/f", "socket": "a.sock"},
                    {"name": "f", "spiffe_id": "spiffe://example.org/g", "socket": "b.sock"}]},
     "workloads[1].name", "twice"),
    ({"workloads": [{"name": "f", "spiffe_id": "spiffe://example.org/f", "socket": "a.sock"},
                    {"name": "g", "spiffe_id": "spiffe://example.org/g", "socket": "a.sock"}]},
     "workloads[1].socket", "already the socket of 'f'"),
    ({"workloads": [{"name": "f", "spiffe_id": "spiffe://example.org/f", "socket": "a.sock", "uid": 0}]},
     "workloads[0].uid", "unknown key"),
    ({"workloads": [{"name": "f", "spiffe_id": "spiffe://example.org/f", "socket": "a.sock", "dns_names": "f"}]},
     "workloads[0].dns_names", "list"),
    ({"workloads": [{"name": "f", "spiffe_id": "spiffe://example.org/f", "socket": "a.sock",
                     "dns_names": ["ok", "bad_name"]}]}, "workloads[0].dns_names[1]", "not a DNS name"),
    ({"workloads": [{"name": "f", "spiffe_id": "spiffe://example.org/f", "socket": "a.sock",
                     "dns_names": ["-f.example"]}]}, "workloads[0].dns_names[0]", "not a DNS name"),
])
def test_errors_name_the_key(tmp_path: Path, overrides: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        IdentityConfig.from_dict(base(**overrides), base_dir=tmp_path)
    assert caught.value.key == key
    assert fragment in caught.value.message
    assert "\n" not in caught.value.message  # one line


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        IdentityConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trust_domains: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        IdentityConfig.from_yaml(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        IdentityConfig.from_yaml(listed)
