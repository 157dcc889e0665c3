"""OPA's control-plane configuration, read from authz-server's config file with OPA's meaning.

Keys (see docs/bundles.md): ``services`` (a list or a map; ``url``, ``headers``,
``credentials.bearer``/``credentials.client_tls``, ``tls``, ``allow_insecure_tls``,
``response_header_timeout_seconds``), ``keys.<id>`` (``key``, ``algorithm``, ``scope``,
``private_key``), ``bundles.<name>`` (``service``, ``resource``, ``polling``, ``signing``,
``persist``, ``size_limit_bytes``), ``decision_logs``, ``status``, ``persistence_directory``,
and ours beside them, ``shadow``. Defaults are OPA's, with two exceptions made for a bounded
server: a bundle file may be at most 64 MiB (OPA: 1 GiB) and the decision-log buffer holds at
most 32 MiB (OPA: unbounded). What OPA offers and we do not (OAuth2, cloud signers, OCI
registries, delta bundles, manual triggers, plugins) is refused by name, never ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

from ..configkeys import boolean as _bool
from ..configkeys import mapping as _mapping
from ..configkeys import only as _only
from ..configkeys import readable_file as _readable_file
from ..configkeys import resolve_path
from ..configkeys import show as _show
from ..configkeys import string as _string
from ..errors import ConfigError
from .archive import DEFAULT_SIZE_LIMIT
from .errors import BundleError
from .signing import SUPPORTED_ALGORITHMS, KeyConfig, VerificationConfig, load_public_key

CONTROL_PLANE_KEYS = ("services", "keys", "bundles", "decision_logs", "status", "persistence_directory", "shadow")
DEFAULT_PERSISTENCE_DIRECTORY = ".opa"
MIN_UPLOAD_BYTES, MAX_UPLOAD_BYTES = 90, 4 * 1024**3
DEFAULT_BUFFER_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    bearer_token: str = ""
    bearer_token_path: str = ""
    bearer_scheme: str = "Bearer"
    client_cert: str = ""
    client_key: str = ""
    client_key_passphrase: str = ""
    ca_cert: str = ""
    system_ca_required: bool = False
    allow_insecure_tls: bool = False
    response_header_timeout: float = 10.0


@dataclass(frozen=True)
class Polling:
    min_delay: float = 60.0
    max_delay: float = 120.0
    long_polling_timeout: int | None = None


@dataclass(frozen=True)
class BundleSource:
    name: str
    service: str
    resource: str
    polling: Polling = field(default_factory=Polling)
    verification: VerificationConfig | None = None
    persist: bool = False
    size_limit: int = DEFAULT_SIZE_LIMIT


@dataclass(frozen=True)
class DecisionLogsConfig:
    service: str
    resource: str = "/logs"
    min_delay: float = 300.0
    max_delay: float = 600.0
    upload_size_limit: int = 32768
    buffer_size_limit: int = DEFAULT_BUFFER_BYTES
    mask_decision: str = "system/log/mask"
    drop_decision: str = "system/log/drop"


@dataclass(frozen=True)
class StatusConfig:
    service: str
    resource: str = "/status"


@dataclass(frozen=True)
class ShadowConfig:
    """``shadow:``: a second policy source decided beside the live one, off the request path."""

    policies: str = ""  # a folder, or
    bundle: str = ""  # the name of one of ``bundles`` (then kept out of the live set)
    sample: float = 1.0


@dataclass(frozen=True)
class ControlPlane:
    services: Mapping[str, ServiceConfig] = field(default_factory=dict)
    keys: Mapping[str, KeyConfig] = field(default_factory=dict)
    bundles: tuple[BundleSource, ...] = ()
    decision_logs: DecisionLogsConfig | None = None
    status: StatusConfig | None = None
    persistence_directory: str = DEFAULT_PERSISTENCE_DIRECTORY
    shadow: ShadowConfig | None = None

    @property
    def live_bundles(self) -> tuple[BundleSource, ...]:
        shadow = self.shadow.bundle if self.shadow is not None else ""
        return tuple(b for b in self.bundles if b.name != shadow)

    @property
    def shadow_bundle(self) -> BundleSource | None:
        if self.shadow is None or not self.shadow.bundle:
            return None
        return next(b for b in self.bundles if b.name == self.shadow.bundle)


# -- readers; each names the key it reads (the generic ones are configkeys.py's)

def _number(value: Any, key: str, *, minimum: float = 0.0, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"expected {'an integer' if integer else 'a number'}, got {_show(value)}", key=key)
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"must be at least {minimum:g}, got {value!r}", key=key)
    return value


def _path(value: Any, key: str, base_dir: str | None) -> str:
    return resolve_path(_string(value, key), base_dir)


_UNSUPPORTED_CREDENTIALS = {
    "oauth2": "OAuth2 client credentials (use bearer.token_path with a token refreshed beside the server)",
    "s3_signing": "AWS request signing", "gcp_metadata": "GCP metadata tokens",
    "azure_managed_identity": "Azure managed identities", "plugin": "credential plugins",
}


def parse_services(value: Any, base_dir: str | None) -> dict[str, ServiceConfig]:
    """``services`` as OPA takes it: a list of ``{name, url, ...}`` or a map of name → ``{url, ...}``."""
    if isinstance(value, list):
        items = []
        for index, item in enumerate(value):
            entry = _mapping(item, f"services[{index}]")
            items.append((_string(entry.get("name", ""), f"services[{index}].name"), entry, f"services[{index}]"))
    else:
        items = [(name, _mapping(entry, f"services.{name}"), f"services.{name}")
                 for name, entry in _mapping(value, "services").items()]
    services: dict[str, ServiceConfig] = {}
    for name, entry, key in items:
        if not name:
            raise ConfigError("every service needs a name", key=key)
        if name in services:
            raise ConfigError(f"service {name!r} is defined twice", key=key)
        services[name] = _service(str(name), entry, key, base_dir)
    return services


def _service(name: str, data: Mapping[str, Any], key: str, base_dir: str | None) -> ServiceConfig:
    _only(data, {"name", "url", "headers", "credentials", "tls", "allow_insecure_tls",
                 "response_header_timeout_seconds"}, f"{key}.", {"type": "OCI registries"})
    url = _string(data.get("url", ""), f"{key}.url").rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"expected an http:// or https:// URL, got {url!r}", key=f"{key}.url")
    values: dict[str, Any] = {"name": name, "url": url}
    headers = _mapping(data.get("headers"), f"{key}.headers")
    values["headers"] = tuple((str(h), _string(v, f"{key}.headers.{h}")) for h, v in headers.items())
    if "allow_insecure_tls" in data:
        values["allow_insecure_tls"] = _bool(data["allow_insecure_tls"], f"{key}.allow_insecure_tls")
    if "response_header_timeout_seconds" in data:
        timeout = _number(data["response_header_timeout_seconds"], f"{key}.response_header_timeout_seconds")
        values["response_header_timeout"] = float(timeout) or 10.0
    tls = _mapping(data.get("tls"), f"{key}.tls")
    _only(tls, {"ca_cert", "system_ca_required"}, f"{key}.tls.")
    if "ca_cert" in tls:
        values["ca_cert"] = _readable_file(_path(tls["ca_cert"], f"{key}.tls.ca_cert", base_dir), f"{key}.tls.ca_cert")
    if "system_ca_required" in tls:
        values["system_ca_required"] = _bool(tls["system_ca_required"], f"{key}.tls.system_ca_required")
    credentials = _mapping(data.get("credentials"), f"{key}.credentials")
    _only(credentials, {"bearer", "client_tls"}, f"{key}.credentials.", _UNSUPPORTED_CREDENTIALS)
    if len(credentials) > 1:
        raise ConfigError("a maximum one credential method must be specified", key=f"{key}.credentials")
    if "bearer" in credentials:
        bearer = _mapping(credentials["bearer"], f"{key}.credentials.bearer")
        prefix = f"{key}.credentials.bearer"
        _only(bearer, {"token", "token_path", "scheme"}, f"{prefix}.")
        if "token" in bearer and "token_path" in bearer:
            raise ConfigError('specify a value for either the "token" or "token_path" field', key=prefix)
        if "token" in bearer:
            values["bearer_token"] = _string(bearer["token"], f"{prefix}.token")
        if "token_path" in bearer:
            values["bearer_token_path"] = _readable_file(_path(bearer["token_path"], f"{prefix}.token_path", base_dir),
                                                    f"{prefix}.token_path")
        if "scheme" in bearer:
            values["bearer_scheme"] = _string(bearer["scheme"], f"{prefix}.scheme") or "Bearer"
    if "client_tls" in credentials:
        prefix = f"{key}.credentials.client_tls"
        client = _mapping(credentials["client_tls"], prefix)
        _only(client, {"cert", "private_key", "private_key_passphrase", "ca_cert", "system_ca_required",
                       "cert_reread_interval_seconds"}, f"{prefix}.")
        for name_in, field_name in (("cert", "client_cert"), ("private_key", "client_key")):
            if name_in not in client:
                raise ConfigError(f"client_tls needs {name_in}", key=prefix)
            values[field_name] = _readable_file(_path(client[name_in], f"{prefix}.{name_in}", base_dir),
                                           f"{prefix}.{name_in}")
        if "private_key_passphrase" in client:
            values["client_key_passphrase"] = _string(client["private_key_passphrase"], f"{prefix}.private_key_passphrase")
        if "ca_cert" in client and "ca_cert" not in values:  # OPA's deprecated place for it
            values["ca_cert"] = _readable_file(_path(client["ca_cert"], f"{prefix}.ca_cert", base_dir), f"{prefix}.ca_cert")
        if "system_ca_required" in client:
            values["system_ca_required"] = _bool(client["system_ca_required"], f"{prefix}.system_ca_required")
    if parts.scheme == "http" and (values.get("client_cert") or values.get("ca_cert")):
        raise ConfigError("TLS settings need an https:// URL", key=f"{key}.url")
    return ServiceConfig(**values)


def parse_keys(value: Any) -> dict[str, KeyConfig]:
    keys: dict[str, KeyConfig] = {}
    for kid, raw in _mapping(value, "keys").items():
        key = f"keys.{kid}"
        data = _mapping(raw, key)
        _only(data, {"key", "private_key", "algorithm", "scope"}, f"{key}.")
        material = _string(data.get("key", ""), f"{key}.key")
        private = _string(data.get("private_key", ""), f"{key}.private_key")
        if not material and not private:
            raise ConfigError(f"invalid keys configuration: no keys provided for key ID {kid}", key=key)
        algorithm = _string(data.get("algorithm", "RS256"), f"{key}.algorithm")
        if algorithm not in SUPPORTED_ALGORITHMS:
            raise ConfigError(f"unsupported algorithm {algorithm!r} (one of {', '.join(SUPPORTED_ALGORITHMS)})",
                              key=f"{key}.algorithm")
        if material and not algorithm.startswith("HS"):
            try:
                load_public_key(material)
            except BundleError as exc:
                raise ConfigError(exc.message, key=f"{key}.key") from None
        keys[str(kid)] = KeyConfig(key=material, algorithm=algorithm,
                                   scope=_string(data.get("scope", ""), f"{key}.scope"), private_key=private)
    return keys


def _default_service(data: Mapping[str, Any], key: str, services: Mapping[str, ServiceConfig]) -> str:
    if "service" in data:
        name = _string(data["service"], f"{key}.service")
        if name not in services:
            raise ConfigError(f"service name {name!r} not found in services", key=f"{key}.service")
        return name
    if not services:
        raise ConfigError("no services configured to fetch from or report to", key=key)
    return next(iter(services))


def _delays(data: Mapping[str, Any], key: str, defaults: tuple[float, float]) -> tuple[float, float]:
    low, high = data.get("min_delay_seconds"), data.get("max_delay_seconds")
    if low is None and high is None:
        return defaults
    if low is None or high is None:
        missing = "min_delay_seconds" if low is None else "max_delay_seconds"
        raise ConfigError(f"configuration missing {missing!r}", key=key)
    low_s = float(_number(low, f"{key}.min_delay_seconds"))
    high_s = float(_number(high, f"{key}.max_delay_seconds"))
    if high_s < low_s:
        raise ConfigError("max delay must be >= min delay", key=f"{key}.max_delay_seconds")
    if high_s <= 0:
        raise ConfigError("must be greater than zero", key=f"{key}.max_delay_seconds")
    return low_s, high_s


def _trigger(data: Mapping[str, Any], key: str) -> None:
    trigger = data.get("trigger", "periodic")
    if trigger != "periodic":
        raise ConfigError(f"only the periodic trigger is supported, got {trigger!r}", key=f"{key}.trigger")


def parse_bundles(value: Any, services: Mapping[str, ServiceConfig], keys: Mapping[str, KeyConfig]
                  ) -> tuple[BundleSource, ...]:
    sources = []
    for name, raw in _mapping(value, "bundles").items():
        key = f"bundles.{name}"
        data = _mapping(raw, key)
        _only(data, {"service", "resource", "polling", "signing", "persist", "size_limit_bytes", "trigger"}, f"{key}.")
        _trigger(data, key)
        resource = _string(data.get("resource", f"bundles/{name}"), f"{key}.resource")
        if resource.startswith("file://"):
            raise ConfigError("file:// resources are not supported: serve a folder with policies: DIR",
                              key=f"{key}.resource")
        polling = _mapping(data.get("polling"), f"{key}.polling")
        _only(polling, {"min_delay_seconds", "max_delay_seconds", "long_polling_timeout_seconds"}, f"{key}.polling.")
        low, high = _delays(polling, f"{key}.polling", (60.0, 120.0))
        long_poll = None
        if "long_polling_timeout_seconds" in polling:
            long_poll = int(_number(polling["long_polling_timeout_seconds"], f"{key}.polling.long_polling_timeout_seconds",
                                    minimum=1, integer=True))
        verification = _verification(data.get("signing"), f"{key}.signing", keys)
        size_limit = int(_number(data.get("size_limit_bytes", DEFAULT_SIZE_LIMIT), f"{key}.size_limit_bytes",
                                 minimum=1, integer=True))
        sources.append(BundleSource(
            name=str(name), service=_default_service(data, key, services), resource=resource,
            polling=Polling(low, high, long_poll), verification=verification,
            persist=_bool(data.get("persist", False), f"{key}.persist"), size_limit=size_limit))
    return tuple(sources)


def _verification(value: Any, key: str, keys: Mapping[str, KeyConfig]) -> VerificationConfig | None:
    if value is None:
        # OPA: with keys configured, a signed bundle is verified against them; an unsigned one passes.
        return VerificationConfig(keys=keys) if keys else None
    data = _mapping(value, key)
    _only(data, {"keyid", "scope", "exclude_files"}, f"{key}.", {"plugin": "signature plugins"})
    keyid = _string(data.get("keyid", ""), f"{key}.keyid")
    if keyid and keyid not in keys:
        raise ConfigError(f"key id {keyid} not found in keys", key=f"{key}.keyid")
    if not keys:
        raise ConfigError("signing needs at least one entry under keys", key=key)
    exclude = data.get("exclude_files", [])
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise ConfigError("expected a list of file patterns", key=f"{key}.exclude_files")
    return VerificationConfig(keys=keys, keyid=keyid, scope=_string(data.get("scope", ""), f"{key}.scope"),
                              exclude_files=tuple(exclude), required=True)


def parse_decision_logs(value: Any, services: Mapping[str, ServiceConfig]) -> DecisionLogsConfig | None:
    data = _mapping(value, "decision_logs")
    _only(data, {"service", "resource", "partition_name", "reporting", "mask_decision", "drop_decision"},
          "decision_logs.", {"plugin": "decision-log plugins", "console": "console logging (use audit: [stdout])",
                             "request_context": "request context headers (the input holds the request)",
                             "nd_builtin_cache": "the non-deterministic built-in cache"})
    if not data:
        return None
    service = _default_service(data, "decision_logs", services)
    resource = _string(data.get("resource", "/logs"), "decision_logs.resource")
    if "partition_name" in data:
        resource = f"/logs/{_string(data['partition_name'], 'decision_logs.partition_name')}"
    reporting = _mapping(data.get("reporting"), "decision_logs.reporting")
    _only(reporting, {"min_delay_seconds", "max_delay_seconds", "upload_size_limit_bytes", "buffer_size_limit_bytes",
                      "buffer_type", "trigger"}, "decision_logs.reporting.",
          {"buffer_size_limit_events": "the event buffer (use buffer_size_limit_bytes)",
           "max_decisions_per_second": "rate-limited logging (use buffer_size_limit_bytes)"})
    if reporting.get("buffer_type", "size") != "size":
        raise ConfigError("only the size buffer is supported", key="decision_logs.reporting.buffer_type")
    _trigger(reporting, "decision_logs.reporting")
    low, high = _delays(reporting, "decision_logs.reporting", (300.0, 600.0))
    upload = int(_number(reporting.get("upload_size_limit_bytes", 32768), "decision_logs.reporting.upload_size_limit_bytes",
                         minimum=1, integer=True))
    upload = min(max(upload, MIN_UPLOAD_BYTES), MAX_UPLOAD_BYTES)  # OPA clamps, with a warning
    buffer = int(_number(reporting.get("buffer_size_limit_bytes", DEFAULT_BUFFER_BYTES),
                         "decision_logs.reporting.buffer_size_limit_bytes", minimum=1, integer=True))
    return DecisionLogsConfig(
        service=service, resource=resource, min_delay=low, max_delay=high, upload_size_limit=upload,
        buffer_size_limit=buffer,
        mask_decision=_data_path(data.get("mask_decision", "/system/log/mask"), "decision_logs.mask_decision"),
        drop_decision=_data_path(data.get("drop_decision", "/system/log/drop"), "decision_logs.drop_decision"))


def _data_path(value: Any, key: str) -> str:
    """OPA's ``ref.ParseDataPath``: ``/system/log/mask`` (or ``system/log/mask``) → ``system/log/mask``."""
    text = _string(value, key).strip("/")
    parts = text.split("/")
    if not text or not all(part.replace("_", "a").isalnum() and not part[0].isdigit() for part in parts):
        raise ConfigError(f"expected a data path like /system/log/mask, got {value!r}", key=key)
    return text


def parse_status(value: Any, services: Mapping[str, ServiceConfig]) -> StatusConfig | None:
    data = _mapping(value, "status")
    _only(data, {"service", "partition_name", "trigger"}, "status.",
          {"plugin": "status plugins", "console": "console status (the server logs each activation)",
           "prometheus": "status metrics (authz-server's /metrics has them)"})
    if not data:
        return None
    _trigger(data, "status")
    partition = _string(data.get("partition_name", ""), "status.partition_name")
    return StatusConfig(service=_default_service(data, "status", services),
                        resource=f"/status/{partition}" if partition else "/status")


def parse_shadow(value: Any, base_dir: str | None, bundle_names: set[str]) -> ShadowConfig:
    data = _mapping(value, "shadow")
    _only(data, {"policies", "bundle", "sample"}, "shadow.")
    policies = _path(data["policies"], "shadow.policies", base_dir) if "policies" in data else ""
    bundle = _string(data.get("bundle", ""), "shadow.bundle")
    if bool(policies) == bool(bundle):
        raise ConfigError("name one shadow policy source: policies: DIR or bundle: NAME", key="shadow")
    if bundle and bundle not in bundle_names:
        raise ConfigError(f"no bundle named {bundle!r} under bundles", key="shadow.bundle")
    sample = float(_number(data.get("sample", 1.0), "shadow.sample"))
    if sample > 1.0:
        raise ConfigError(f"a fraction between 0 and 1, got {sample!r}", key="shadow.sample")
    return ShadowConfig(policies=policies, bundle=bundle, sample=sample)


def parse_control_plane(data: Mapping[str, Any], base_dir: str | None) -> ControlPlane | None:
    """The control-plane keys of a config mapping, or None when it has none."""
    if not any(key in data for key in CONTROL_PLANE_KEYS):
        return None
    services = parse_services(data.get("services") or {}, base_dir)
    keys = parse_keys(data.get("keys"))
    bundles = parse_bundles(data.get("bundles"), services, keys)
    shadow = parse_shadow(data["shadow"], base_dir, {b.name for b in bundles}) if data.get("shadow") is not None \
        else None
    persistence = DEFAULT_PERSISTENCE_DIRECTORY  # OPA's: .opa in the working directory
    if "persistence_directory" in data:
        persistence = _path(data["persistence_directory"], "persistence_directory", base_dir)
    plane = ControlPlane(services=services, keys=keys, bundles=bundles,
                         decision_logs=parse_decision_logs(data.get("decision_logs"), services),
                         status=parse_status(data.get("status"), services), persistence_directory=persistence,
                         shadow=shadow)
    if "policies" in data and plane.live_bundles:
        raise ConfigError("policies (a folder) and bundles may not both be set: serve one or the other",
                          key="bundles")
    return plane
