"""The issuer: every trust domain's CA, every registered workload's current SVID, and what each
workload is allowed to see. Plain state over a ``now`` passed in; no sockets, no event loop.

A workload sees a *snapshot*: its X.509-SVID, its own trust domain's bundle, and the bundles
of the trust domains its own one ``federates_with``. Federated bundles reach it the way they
would cross an organisation boundary: serialized as SPIFFE bundle documents and parsed back
(the documents are also written to ``state_dir/bundles/<trust domain>.json``). A remote
partner's bundle (another issuer's, fetched from its bundle endpoint) arrives through
``federate``, is kept in ``state_dir/federated/<trust domain>.json`` for the next start, and
is absent until first fetched: its SVIDs are not trusted before that. Every change
that a workload would see bumps its snapshot's ``version``; ``advance``/``rotate_*`` return
which workloads changed so the servers can push.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping

from ..identity.jose import JwkSet
from .bundle import BundleError, TrustBundle, parse_spiffe_bundle
from .ca import CaChange, CertificateAuthority
from .files import private_dir, write_atomic
from .config import IdentityConfig, WorkloadConfig
from .svid import JwtSvid, ValidatedJwtSvid, X509Svid, issue_jwt_svid, issue_x509_svid, validate_jwt_svid

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkloadSnapshot:
    """Everything one workload is served at one moment."""

    workload: WorkloadConfig
    svid: X509Svid
    bundle: TrustBundle
    federated: Mapping[str, TrustBundle] = field(default_factory=dict)  # trust domain name → bundle
    version: int = 1

    @property
    def spiffe_id(self) -> str:
        return self.workload.spiffe_id

    @property
    def trust_domain(self) -> str:
        return self.bundle.trust_domain

    def bundles(self) -> dict[str, TrustBundle]:
        """Own and federated bundles by trust domain name, own first."""
        return {self.bundle.trust_domain: self.bundle, **self.federated}


@dataclass(frozen=True, slots=True)
class Changes:
    workloads: frozenset[str] = frozenset()
    trust_domains: frozenset[str] = frozenset()  # whose bundle changed

    def __bool__(self) -> bool:
        return bool(self.workloads or self.trust_domains)


class Issuer:
    def __init__(self, config: IdentityConfig, *, now: float) -> None:
        self.config = config
        state = Path(config.state_dir)
        private_dir(state)
        self._bundle_dir = state / "bundles"
        private_dir(self._bundle_dir)
        self._cas = {
            td.name: CertificateAuthority(td.name, state / td.name, ca_ttl=config.ca_ttl,
                                          publish_ahead=config.ca_publish_ahead,
                                          jwt_algorithm=config.jwt_algorithm, now=now)
            for td in config.trust_domains
        }
        for ca in self._cas.values():
            ca.advance(now)
        self._bundles: dict[str, TrustBundle] = {}
        self._exchanged: dict[str, TrustBundle] = {}
        self._refresh_bundles(self._cas)
        self._federated_dir = state / "federated"
        private_dir(self._federated_dir)
        for partner in config.remote_partners:
            self._load_federated(partner.trust_domain)
        self._workloads = {w.name: w for w in config.workloads}
        self._svids = {w.name: self._issue(w, now) for w in config.workloads}
        self._versions = {w.name: 1 for w in config.workloads}

    # -- what is served ------------------------------------------------------------------------

    @property
    def workloads(self) -> Mapping[str, WorkloadConfig]:
        return MappingProxyType(self._workloads)

    def certificate_authority(self, trust_domain: str) -> CertificateAuthority:
        return self._cas[trust_domain]

    def bundle(self, trust_domain: str) -> TrustBundle:
        return self._bundles[trust_domain]

    def snapshot(self, workload: str) -> WorkloadSnapshot:
        config = self._workloads[workload]
        domain = config.trust_domain
        partners = self.config.trust_domain(domain).federates_with
        return WorkloadSnapshot(config, self._svids[workload], self._bundles[domain],
                                MappingProxyType({p: self._exchanged[p] for p in partners if p in self._exchanged}),
                                self._versions[workload])

    def next_event(self) -> float:
        """When ``advance`` next has work: an SVID at half-life, or a CA schedule step."""
        times = [svid.refresh_at for svid in self._svids.values()]
        times.extend(ca.next_event() for ca in self._cas.values())
        return min(times)

    # -- remote partners' bundles ----------------------------------------------------------

    def federate(self, bundle: TrustBundle) -> Changes:
        """A remote partner's bundle as fetched from its bundle endpoint: served from now on to
        every workload whose trust domain federates with it (no change: nothing to push)."""
        name = bundle.trust_domain
        if name not in {p.trust_domain for p in self.config.remote_partners}:
            raise KeyError(f"{name!r} is not a remote partner")
        held = self._exchanged.get(name)
        if held is not None and held.to_spiffe() == bundle.to_spiffe():
            return Changes()
        if held is not None and bundle.sequence < held.sequence:
            log.warning("the bundle of %s went from sequence %d back to %d", name, held.sequence, bundle.sequence)
        self._exchanged[name] = bundle
        write_atomic(self._federated_dir / f"{name}.json", bundle.to_json(), mode=0o600)
        touched = {w for w, config in self._workloads.items()
                   if name in self.config.trust_domain(config.trust_domain).federates_with}
        for workload in touched:
            self._versions[workload] += 1
        log.info("federated bundle of %s: sequence %d, %d X.509 and %d JWT authorities", name, bundle.sequence,
                 len(bundle.x509_authorities), len(bundle.jwt_authorities))
        return Changes(frozenset(touched), frozenset({name}))

    def _load_federated(self, name: str) -> None:
        path = self._federated_dir / f"{name}.json"
        try:
            self._exchanged[name] = parse_spiffe_bundle(name, path.read_bytes())
        except FileNotFoundError:
            pass
        except (OSError, BundleError) as exc:
            log.warning("ignoring the stored bundle of %s (%s): waiting for its bundle endpoint", name, exc)

    # -- JWT-SVIDs -----------------------------------------------------------------------------

    def issue_jwt_svid(self, workload: str, audience: Iterable[str], *, now: float) -> JwtSvid:
        config = self._workloads[workload]
        authority = self._cas[config.trust_domain].active
        return issue_jwt_svid(config.spiffe_id, tuple(audience), key=authority.jwt_key, kid=authority.jwt_kid,
                              alg=authority.jwt_algorithm, ttl=self.config.jwt_svid_ttl, now=now,
                              not_after=authority.not_after)

    def validate_jwt_svid(self, workload: str, token: str, audience: str, *, now: float) -> ValidatedJwtSvid:
        """Validate against the JWT bundles this workload trusts (own and federated); raises ``SvidError``."""
        keys: dict[str, JwkSet] = {name: bundle.jwt_keys() for name, bundle in self.snapshot(workload).bundles().items()}
        return validate_jwt_svid(token, audience, keys, now=now)

    # -- rotation ------------------------------------------------------------------------------

    def advance(self, now: float) -> Changes:
        """Do whatever the schedule says is due at ``now``."""
        ca_changes = {name: ca.advance(now) for name, ca in self._cas.items()}
        due = {name for name, svid in self._svids.items() if now >= svid.refresh_at}
        return self._apply(ca_changes, due, now)

    def rotate_svids(self, now: float, workloads: Iterable[str] | None = None) -> Changes:
        """Re-issue the X.509-SVIDs of ``workloads`` (default: all) now."""
        names = set(self._workloads) if workloads is None else set(workloads)
        unknown = names - set(self._workloads)
        if unknown:
            raise KeyError(f"no workload named {sorted(unknown)[0]!r}")
        return self._apply({}, names, now)

    def rotate_ca(self, trust_domain: str, now: float, *, activate_after: float | None = None) -> Changes:
        """Publish a new CA for ``trust_domain`` now; it signs (and every SVID of the domain is
        re-issued by it) ``activate_after`` seconds later (default ``ca_publish_ahead``)."""
        if trust_domain not in self._cas:
            raise KeyError(f"no trust domain named {trust_domain!r}")
        change = self._cas[trust_domain].prepare(now, activate_after=activate_after)
        return self._apply({trust_domain: change}, set(), now)

    def _apply(self, ca_changes: Mapping[str, CaChange], reissue: set[str], now: float) -> Changes:
        bundle_changed = {name for name, change in ca_changes.items() if change.bundle_changed}
        activated = {name for name, change in ca_changes.items() if change.activated}
        self._refresh_bundles(bundle_changed)
        touched = set(reissue)
        for name, workload in self._workloads.items():
            domain = workload.trust_domain
            if domain in activated:
                reissue.add(name)
                touched.add(name)
            sees = {domain, *self.config.trust_domain(domain).federates_with}
            if sees & bundle_changed:
                touched.add(name)
        for name in reissue:
            old = self._svids[name]
            self._svids[name] = self._issue(self._workloads[name], now)
            log.info("rotated the X.509-SVID of %s (%s): serial %x, valid until %.0f (was serial %x)",
                     name, self._workloads[name].spiffe_id, self._svids[name].serial_number,
                     self._svids[name].expires_at, old.serial_number)
        for name in touched:
            self._versions[name] += 1
        return Changes(frozenset(touched), frozenset(bundle_changed))

    def _issue(self, workload: WorkloadConfig, now: float) -> X509Svid:
        authority = self._cas[workload.trust_domain].active
        return issue_x509_svid(workload.spiffe_id, ca_certificate=authority.certificate, ca_key=authority.private_key,
                               authority_id=authority.id, ttl=self.config.svid_ttl, now=now,
                               dns_names=workload.dns_names)

    def _refresh_bundles(self, domains: Iterable[str]) -> None:
        for name in domains:
            bundle = self._cas[name].bundle(refresh_hint=self.config.bundle_refresh_hint)
            self._bundles[name] = bundle
            document = bundle.to_json()
            # What a federated partner reads: the SPIFFE bundle document, parsed back.
            self._exchanged[name] = parse_spiffe_bundle(name, document)
            write_atomic(self._bundle_dir / f"{name}.json", document, mode=0o644)

