"""Network PKI for the worker daemon: one certificate authority per network.

The admin node of a network holds the network CA (ECDSA P-256, self-signed). Every
node, the admin included, has its own P-256 key and a certificate the CA signed from
the node's CSR. Nodes talk over mutually authenticated TLS 1.3 with the CA as the only
trust anchor; a CA-signed CRL travels with the network config; one-time join tokens
let a new machine find and trust the admin; a challenge-response after the handshake
proves, at the application layer, that the peer holds the key of its certificate.

Sources: RFC 5280 (X.509 certificates and CRLs), RFC 2986 (PKCS #10 CSR),
RFC 8446 (TLS 1.3), FIPS 186-5 / SEC 1 (ECDSA P-256 with SHA-256).

Decisions
---------
Identity in a node certificate (RFC 5280 §4.1.2.6, §4.2.1.6):
    subject ``CN=<node id>, O=<network id>, OU=<role>``, role one of
    ``admin|worker|backup``. OU is the standard attribute for "the part of an
    organisation the subject belongs to": it needs no private OID and every X.509 tool
    shows it. The CA writes the subject from its own arguments; from the CSR it takes
    only the public key (the CSR's CN and O must match what the admin approves).
    subjectAltName is ``URI:urn:argus:node:<node id>``; there is no dNSName because
    node ids are identifiers, not DNS names. EKU is serverAuth + clientAuth: every node
    both accepts and opens connections.

Hostname checking (RFC 8446 §4.4.2, RFC 6125):
    ``client_context`` sets ``check_hostname=False``. Peers are reached by LAN address
    (often DHCP-assigned) and named by node id, so a DNS-name check would check the
    wrong thing. TLS still verifies the chain to the network CA (CERT_REQUIRED); the
    "who exactly is this" check is ``peer_identity(ssl_object, expected_node_id=...)``
    after the handshake, on both sides (a TLS server never checks a client's name
    anyway, so one code path serves both). A caller that skips it accepts any member
    of the network as the peer: the daemon's connection loop must call it.

Revocation (RFC 5280 §5):
    Python's ``load_verify_locations(cadata=...)`` accepts only certificates (OpenSSL
    3.0: "cadata does not contain a certificate"), but ``cafile=`` loads a CRL, so the
    TLS contexts write the verified CRL to a private temporary file, load it, and set
    ``VERIFY_CRL_CHECK_LEAF``: OpenSSL then refuses a revoked peer in the handshake
    (alert ``certificate_revoked``). ``peer_identity(..., crl=...)`` checks again after
    the handshake, so a connection opened before a CRL update can be re-checked
    against the new CRL. Servers send no session tickets, so every connection does a
    full handshake against the context's current CRL. A CRL expires (``nextUpdate``,
    ``CRL_VALIDITY_DAYS``); OpenSSL then refuses every peer ("CRL has expired"), so
    the contexts refuse an expired CRL up front (InvalidCRL) and the admin re-signs
    it (``refresh_crl``) well before that date.

Join tokens:
    signed with the CA key (ECDSA P-256 / SHA-256, raw r||s), not with an HMAC
    secret: the admin needs no second secret, and a joiner that has fetched the CA
    certificate (and matched its fingerprint to the token's) can check the signature
    too (``verify_join_token``). Text form: ``argus1.<base64url JSON>.<base64url sig>``,
    URL-safe and pasteable. Single use is enforced by the admin's ``TokenRegistry``.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
import re
import secrets
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("admin", "worker", "backup", "control")  # "control": only on a daemon's local control CA
CA_VALIDITY_DAYS = 3650
NODE_VALIDITY_DAYS = 365
CRL_VALIDITY_DAYS = 365
CLOCK_SKEW = dt.timedelta(minutes=5)  # notBefore is backdated by this much
JOIN_TOKEN_TTL_S = 900
CHALLENGE_BYTES = 32
NODE_URN_PREFIX = "urn:argus:node:"
TOKEN_PREFIX = "argus1"

_CURVE = ec.SECP256R1
_ECDSA = ec.ECDSA(hashes.SHA256())
_P256_BYTES = 32
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
_CHALLENGE_LABEL = b"argus-challenge-v1\x00"

PathLike = str | os.PathLike
CertLike = x509.Certificate | bytes | str
CrlLike = x509.CertificateRevocationList | bytes | str


# --- errors -------------------------------------------------------------------------


class PKIError(Exception):
    """Base of every error raised by the network PKI."""


class InvalidCSR(PKIError):
    """A CSR is malformed, badly signed, or names another node or network."""


class InvalidCRL(PKIError):
    """A CRL is malformed or not signed by the network CA."""


class TokenInvalid(PKIError):
    """A join token is malformed, forged, or belongs to another network."""


class TokenExpired(PKIError):
    """A join token is past its expiry time."""


class TokenReused(PKIError):
    """A join token was already redeemed."""


class ChallengeFailed(PKIError):
    """A challenge signature is wrong, or its nonce was already used."""


class NotAuthenticated(PKIError):
    """A TLS peer has no certificate, or it does not name the expected network node."""


class CertificateRevoked(NotAuthenticated):
    """A certificate's serial number is on the network CRL (a kind of NotAuthenticated)."""


# --- small helpers ------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _check_id(kind: str, value: str) -> str:
    """Raise ValueError unless ``value`` is 1-64 chars of [A-Za-z0-9_.-], alphanumeric first."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(f"{kind} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit")
    return value


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role {role!r} must be one of {', '.join(ROLES)}")
    return role


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64u(text: str) -> bytes:
    """Decode unpadded base64url; raise ValueError on any other alphabet."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _name_attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    values = name.get_attributes_for_oid(oid)
    return values[0].value if len(values) == 1 else None


def as_cert(cert: CertLike) -> x509.Certificate:
    """A certificate from a PEM string/bytes or an ``x509.Certificate`` (returned as is);
    raises ValueError for text that is not a PEM certificate."""
    if isinstance(cert, x509.Certificate):
        return cert
    data = cert.encode("ascii") if isinstance(cert, str) else cert
    return x509.load_pem_x509_certificate(data)


def _as_crl(crl: CrlLike) -> x509.CertificateRevocationList:
    if isinstance(crl, x509.CertificateRevocationList):
        return crl
    data = crl.encode("ascii") if isinstance(crl, str) else crl
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError as e:
        raise InvalidCRL(f"CRL is not valid PEM: {e}") from e


def pem(obj: x509.Certificate | x509.CertificateRevocationList | x509.CertificateSigningRequest) -> bytes:
    """PEM encoding of a certificate, CRL or CSR."""
    return obj.public_bytes(serialization.Encoding.PEM)


def certificate_fingerprint(cert: CertLike) -> str:
    """SHA-256 of the certificate's DER encoding, 64 lowercase hex characters."""
    return as_cert(cert).fingerprint(hashes.SHA256()).hex()


def ca_fingerprint(cert: CertLike) -> str:
    """SHA-256 of the CA certificate's DER encoding, 64 lowercase hex characters."""
    return certificate_fingerprint(cert)


def network_of(ca_cert: CertLike) -> str:
    """The network id a CA certificate is for (its subject O)."""
    network_id = _name_attr(as_cert(ca_cert).subject, NameOID.ORGANIZATION_NAME)
    if network_id is None:
        raise PKIError("CA certificate has no single O (network id) in its subject")
    return network_id


# --- the network CA -----------------------------------------------------------------


def _ca_name(network_id: str, name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, network_id),
    ])


def create_network_ca(
    network_id: str, name: str, validity_days: int = CA_VALIDITY_DAYS
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new network CA: (P-256 key, self-signed certificate valid ``validity_days`` days).

    Subject ``CN=<name>, O=<network id>``. Extensions (RFC 5280 §4.2.1): BasicConstraints
    CA=True pathLen=0 (critical: it signs node certificates only), KeyUsage
    keyCertSign+cRLSign (critical), Subject Key Identifier.

    Raises ValueError on a malformed network id or a name outside 1-64 characters.
    """
    _check_id("network id", network_id)
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        raise ValueError(f"network name {name!r} must be 1-64 characters")
    key = ec.generate_private_key(_CURVE())
    subject = _ca_name(network_id, name)
    now = _utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """KeyUsage for a CA (keyCertSign, cRLSign) or a TLS node (digitalSignature)."""
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )


# --- node identity ------------------------------------------------------------------


@dataclass(frozen=True)
class NodeIdentity:
    """Who a node certificate names: node id, role, network id, SHA-256 fingerprint
    (hex of DER) and the end of its validity (UTC)."""

    node_id: str
    role: str
    network_id: str
    fingerprint: str
    not_after: dt.datetime


def new_node_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key for a node."""
    return ec.generate_private_key(_CURVE())


def make_csr(key: ec.EllipticCurvePrivateKey, node_id: str, network_id: str) -> bytes:
    """A PEM PKCS #10 CSR (RFC 2986) with subject ``CN=<node id>, O=<network id>``.

    Raises ValueError on a malformed id.
    """
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, _check_id("node id", node_id)),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, _check_id("network id", network_id)),
    ])
    return pem(x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256()))


def _load_csr(csr_pem: bytes | str, node_id: str, network_id: str) -> x509.CertificateSigningRequest:
    """Parse and check a CSR: valid PEM, valid self-signature, P-256 key, CN/O as approved.

    Raises InvalidCSR naming the failed check.
    """
    data = csr_pem.encode("ascii") if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise InvalidCSR(f"CSR is not valid PEM: {e}") from e
    if not csr.is_signature_valid:
        raise InvalidCSR("CSR signature does not verify with its own public key")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _CURVE):
        raise InvalidCSR("CSR key must be ECDSA P-256")
    cn = _name_attr(csr.subject, NameOID.COMMON_NAME)
    org = _name_attr(csr.subject, NameOID.ORGANIZATION_NAME)
    if cn != node_id or org != network_id:
        raise InvalidCSR(f"CSR names node {cn!r} in network {org!r}, expected {node_id!r} in {network_id!r}")
    return csr


def check_csr(csr_pem: bytes | str, node_id: str, network_id: str) -> None:
    """Raise InvalidCSR unless ``csr_pem`` is a valid P-256 CSR for ``node_id`` in ``network_id``."""
    _load_csr(csr_pem, node_id, network_id)


def sign_node_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: CertLike,
    csr_pem: bytes | str,
    node_id: str,
    role: str,
    validity_days: int = NODE_VALIDITY_DAYS,
    *,
    now: dt.datetime | None = None,
) -> bytes:
    """The PEM node certificate the CA issues for ``csr_pem``.

    Subject ``CN=<node id>, O=<network id>, OU=<role>``; SAN ``URI:urn:argus:node:<id>``;
    BasicConstraints CA=False, KeyUsage digitalSignature, EKU serverAuth+clientAuth,
    SKI/AKI; random 159-bit serial (RFC 5280 §4.1.2.2). Valid from ``now`` minus
    ``CLOCK_SKEW`` for ``validity_days`` days, never past the CA's own notAfter.
    ``now`` (default: the current time) exists so tests can issue expired certificates.

    Raises InvalidCSR (bad PEM or signature, not P-256, CN/O not ``node_id``/the CA's
    network) and ValueError (malformed node id, unknown role, validity_days < 1).
    """
    ca_cert = as_cert(ca_cert)
    network_id = network_of(ca_cert)
    _check_id("node id", node_id)
    _check_role(role)
    if validity_days < 1:
        raise ValueError(f"validity_days must be >= 1, got {validity_days}")
    csr = _load_csr(csr_pem, node_id, network_id)
    start = now or _utcnow()
    end = min(start + dt.timedelta(days=validity_days), ca_cert.not_valid_after_utc)
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, node_id),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, network_id),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(NODE_URN_PREFIX + node_id)]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return pem(cert)


def node_identity(cert: CertLike) -> NodeIdentity:
    """The NodeIdentity a node certificate names.

    Raises NotAuthenticated when the certificate does not carry exactly one CN, O and
    OU, the OU is not a known role, or the SAN URI does not repeat the CN.
    It checks no signature: callers pair it with TLS verification or ``peer_identity``.
    """
    cert = as_cert(cert)
    node_id = _name_attr(cert.subject, NameOID.COMMON_NAME)
    network_id = _name_attr(cert.subject, NameOID.ORGANIZATION_NAME)
    role = _name_attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if node_id is None or network_id is None or role not in ROLES:
        raise NotAuthenticated(f"certificate subject {cert.subject.rfc4514_string()!r} names no Argus node")
    if _node_urns(cert) != [NODE_URN_PREFIX + node_id]:
        raise NotAuthenticated(f"certificate SAN does not name node {node_id!r}")
    return NodeIdentity(node_id, role, network_id, certificate_fingerprint(cert), cert.not_valid_after_utc)


def _node_urns(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


# --- revocation ---------------------------------------------------------------------


def _issue_crl(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked: list[x509.RevokedCertificate],
    number: int,
    validity_days: int,
) -> x509.CertificateRevocationList:
    now = _utcnow()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=validity_days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca_key, hashes.SHA256())


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def new_crl(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: CertLike, validity_days: int = CRL_VALIDITY_DAYS
) -> x509.CertificateRevocationList:
    """An empty CRL (RFC 5280 §5) signed by the CA, CRL number 1, valid ``validity_days`` days."""
    return _issue_crl(ca_key, as_cert(ca_cert), [], 1, validity_days)


def verify_crl(crl: CrlLike, ca_cert: CertLike) -> x509.CertificateRevocationList:
    """The CRL, parsed, after checking it was issued and signed by ``ca_cert``.

    Raises InvalidCRL on bad PEM, another issuer name, or a signature that does not
    verify with the CA's public key.
    """
    crl, ca_cert = _as_crl(crl), as_cert(ca_cert)
    if crl.issuer != ca_cert.subject:
        raise InvalidCRL(f"CRL issuer {crl.issuer.rfc4514_string()!r} is not the network CA")
    if not crl.is_signature_valid(ca_cert.public_key()):
        raise InvalidCRL("CRL signature does not verify with the network CA key")
    return crl


def revoke(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: CertLike,
    crl: CrlLike | None,
    serial: int,
    validity_days: int = CRL_VALIDITY_DAYS,
) -> x509.CertificateRevocationList:
    """A new CRL: the entries of ``crl`` (None: none) plus ``serial``, CRL number + 1.

    Revoking a serial twice keeps its first revocation date. Raises InvalidCRL if
    ``crl`` is not signed by this CA.
    """
    ca_cert = as_cert(ca_cert)
    old = verify_crl(crl, ca_cert) if crl is not None else None
    entries = list(old) if old is not None else []
    if all(e.serial_number != serial for e in entries):
        entries.append(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_utcnow()).build()
        )
    number = _crl_number(old) + 1 if old is not None else 1
    return _issue_crl(ca_key, ca_cert, entries, number, validity_days)


def refresh_crl(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: CertLike, crl: CrlLike, validity_days: int = CRL_VALIDITY_DAYS
) -> x509.CertificateRevocationList:
    """The same entries re-signed with a new nextUpdate and CRL number + 1.

    Raises InvalidCRL if ``crl`` is not signed by this CA.
    """
    ca_cert = as_cert(ca_cert)
    old = verify_crl(crl, ca_cert)
    return _issue_crl(ca_key, ca_cert, list(old), _crl_number(old) + 1, validity_days)


def is_revoked(crl: CrlLike, cert: CertLike, ca_cert: CertLike | None = None) -> bool:
    """Whether ``cert``'s serial is on ``crl`` (and the CRL is from the cert's issuer).

    With ``ca_cert`` the CRL's signature is verified first (InvalidCRL if it fails);
    without it the caller must have verified the CRL (``verify_crl``).
    Raises InvalidCRL if the CRL's issuer is not the certificate's issuer.
    """
    crl = verify_crl(crl, ca_cert) if ca_cert is not None else _as_crl(crl)
    cert = as_cert(cert)
    if crl.issuer != cert.issuer:
        raise InvalidCRL("CRL and certificate have different issuers")
    return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


# --- join tokens --------------------------------------------------------------------


@dataclass(frozen=True)
class JoinClaims:
    """What a join token says: the network, where its admin listens ("host:port"), the
    CA fingerprint the joiner must see there, a random token id, and the expiry (Unix s)."""

    network_id: str
    admin_address: str
    ca_fingerprint: str
    token_id: str
    expires_at: int

    @property
    def admin_host(self) -> str:
        return _split_address(self.admin_address)[0]

    @property
    def admin_port(self) -> int:
        return _split_address(self.admin_address)[1]


def _split_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"; ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"admin address {address!r} must be host:port with a port 1-65535")
    return host, int(port)


def _sign_raw(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256/SHA-256 signature as fixed-size r||s (64 bytes), not DER."""
    r, s = decode_dss_signature(key.sign(data, _ECDSA))
    return r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")


def _verify_raw(public_key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    if len(signature) != 2 * _P256_BYTES:
        return False
    r = int.from_bytes(signature[:_P256_BYTES], "big")
    s = int.from_bytes(signature[_P256_BYTES:], "big")
    try:
        public_key.verify(encode_dss_signature(r, s), data, _ECDSA)
    except InvalidSignature:
        return False
    return True


def issue_join_token(
    ca_key: ec.EllipticCurvePrivateKey,
    network_id: str,
    admin_address: str,
    ca_fingerprint: str,
    ttl_s: int = JOIN_TOKEN_TTL_S,
    *,
    now: float | None = None,
) -> str:
    """A one-time join token valid ``ttl_s`` seconds from ``now`` (default: the current time).

    Format: ``argus1.<base64url(JSON claims)>.<base64url(r||s)>``, the ECDSA P-256
    signature by the CA key over ``argus1.<claims part>``. Claims: ``v`` (1), ``net``,
    ``adm`` ("host:port"), ``fp`` (CA SHA-256 fingerprint, hex), ``jti`` (128 random
    bits), ``exp`` (Unix seconds). About 300 characters of [A-Za-z0-9._-].

    Raises ValueError on a malformed network id, address or fingerprint, or ttl_s < 1.
    """
    _check_id("network id", network_id)
    _split_address(admin_address)
    if not _FINGERPRINT_RE.fullmatch(ca_fingerprint):
        raise ValueError("ca_fingerprint must be 64 lowercase hex characters (SHA-256)")
    if ttl_s < 1:
        raise ValueError(f"ttl_s must be >= 1, got {ttl_s}")
    issued = time.time() if now is None else now
    claims = {
        "v": 1, "net": network_id, "adm": admin_address, "fp": ca_fingerprint,
        "jti": _b64u(secrets.token_bytes(16)), "exp": int(issued + ttl_s),
    }
    body = _b64u(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode("utf-8"))
    signed = f"{TOKEN_PREFIX}.{body}"
    return f"{signed}.{_b64u(_sign_raw(ca_key, signed.encode('ascii')))}"


def _split_token(token: str) -> tuple[str, JoinClaims, bytes]:
    """(signed part, claims, raw signature) of a token; TokenInvalid if malformed."""
    parts = token.strip().split(".") if isinstance(token, str) else []
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise TokenInvalid("join token is not of the form argus1.<claims>.<signature>")
    try:
        raw = json.loads(_unb64u(parts[1]))
        signature = _unb64u(parts[2])
        claims = JoinClaims(
            network_id=_check_id("network id", raw["net"]),
            admin_address=raw["adm"],
            ca_fingerprint=raw["fp"],
            token_id=raw["jti"],
            expires_at=raw["exp"],
        )
        _split_address(claims.admin_address)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
        raise TokenInvalid(f"join token claims are malformed: {e}") from e
    if raw.get("v") != 1 or not isinstance(claims.expires_at, int) or not isinstance(claims.token_id, str):
        raise TokenInvalid("join token has an unknown version or malformed claims")
    if not isinstance(claims.ca_fingerprint, str) or not _FINGERPRINT_RE.fullmatch(claims.ca_fingerprint):
        raise TokenInvalid("join token CA fingerprint is not 64 hex characters")
    return f"{parts[0]}.{parts[1]}", claims, signature


def parse_join_token(token: str) -> JoinClaims:
    """The claims of a join token, without checking its signature or expiry (joiner side).

    The joiner connects to ``admin_address`` and accepts the admin only if the CA
    certificate it is shown has fingerprint ``ca_fingerprint``. Raises TokenInvalid.
    """
    return _split_token(token)[1]


def verify_join_token(token: str, ca_cert: CertLike) -> JoinClaims:
    """The claims of a join token after checking the CA's signature and fingerprint.

    Does not check expiry or single use (``TokenRegistry.redeem`` does). Raises
    TokenInvalid when malformed, signed by another key, or naming another CA.
    """
    signed, claims, signature = _split_token(token)
    ca_cert = as_cert(ca_cert)
    if not _verify_raw(ca_cert.public_key(), signature, signed.encode("ascii")):
        raise TokenInvalid("join token signature does not verify with this network's CA key")
    if claims.ca_fingerprint != ca_fingerprint(ca_cert) or claims.network_id != network_of(ca_cert):
        raise TokenInvalid("join token names another network or CA")
    return claims


class TokenRegistry:
    """The admin's record of redeemed join tokens, persisted as JSON (mode 0600).

    ``redeem`` is atomic across threads: a lock covers check, mark and the durable
    write, so of any number of concurrent redeemers of one token exactly one gets the
    claims. Use is keyed by the token id inside the signed claims, not by the token
    text, so a re-encoded signature (ECDSA's (r, n - s)) is still the same token. One
    admin process owns the file (no cross-process lock). Entries are pruned once their
    token has expired, since an expired token is refused anyway.
    """

    def __init__(self, path: PathLike, ca_cert: CertLike) -> None:
        self.path = Path(path)
        self.ca_cert = as_cert(ca_cert)
        self._lock = threading.Lock()
        self._used: dict[str, int] = self._load()

    def _load(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise PKIError(f"token registry {self.path} is unreadable: {e}") from e
        used = data.get("used", {}) if isinstance(data, dict) else None
        try:
            return {str(k): int(v) for k, v in used.items()}
        except (AttributeError, TypeError, ValueError) as e:
            raise PKIError(f"token registry {self.path} has no valid 'used' object") from e

    def _save(self) -> None:
        body = json.dumps({"version": 1, "used": self._used}, sort_keys=True).encode("utf-8")
        atomic_write(self.path, body, mode=0o600)

    def redeem(self, token: str, *, now: float | None = None) -> JoinClaims:
        """The claims of ``token``, marking it used (durably, before returning).

        Raises TokenInvalid (malformed, forged, other network), TokenExpired
        (``now`` >= exp; ``now`` defaults to the current time), TokenReused, or
        OSError if the registry file cannot be written (the token stays unused).
        """
        claims = verify_join_token(token, self.ca_cert)
        now = time.time() if now is None else now
        with self._lock:
            if claims.token_id in self._used:
                raise TokenReused("join token was already used; ask the admin for a new one")
            if now >= claims.expires_at:
                raise TokenExpired("join token has expired; ask the admin for a new one")
            previous = dict(self._used)
            self._used = {k: v for k, v in self._used.items() if v > now}
            self._used[claims.token_id] = claims.expires_at
            try:
                self._save()
            except OSError:
                self._used = previous
                raise
        return claims


# --- challenge-response after the handshake -----------------------------------------


def make_challenge() -> bytes:
    """A fresh 32-byte random nonce."""
    return secrets.token_bytes(CHALLENGE_BYTES)


def _length_prefixed(*fields: bytes) -> bytes:
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def challenge_context(
    network_id: str, client_fingerprint: str, server_fingerprint: str, client_nonce: bytes, server_nonce: bytes
) -> bytes:
    """The bytes that bind a challenge signature to one connection.

    Python's ssl module offers neither tls-unique (undefined in TLS 1.3, RFC 8446
    §C.5) nor the TLS exporter (RFC 8446 §7.5, RFC 9266 tls-exporter), so the context is
    the network id, the client's and the server's certificate fingerprints (SHA-256
    hex, as each side saw them in the handshake) and both nonces, length-prefixed in
    that fixed order; both ends compute the same bytes.

    What it gives: a signature made on one connection does not verify on another
    (different nonces, or different certificates if a third party relays it), nor in
    another network. Its limit: it is not bound to the TLS session keys, so it proves
    that the holder of the peer certificate's key took part *now*, while TLS 1.3's own
    CertificateVerify (which signs the handshake transcript) is what binds the peer to
    this encrypted channel. A thief of a node key can pass both; revoke the node.
    """
    return _length_prefixed(
        network_id.encode("utf-8"),
        client_fingerprint.encode("ascii"),
        server_fingerprint.encode("ascii"),
        client_nonce,
        server_nonce,
    )


def _challenge_message(nonce: bytes, context: bytes) -> bytes:
    return _CHALLENGE_LABEL + _length_prefixed(nonce, context)


def sign_challenge(node_key: ec.EllipticCurvePrivateKey, nonce: bytes, context: bytes) -> bytes:
    """ECDSA P-256/SHA-256 signature (DER) over a domain label, the peer's nonce and the context.

    Raises ValueError if the nonce is not 32 bytes.
    """
    if len(nonce) != CHALLENGE_BYTES:
        raise ValueError(f"nonce must be {CHALLENGE_BYTES} bytes, got {len(nonce)}")
    return node_key.sign(_challenge_message(nonce, context), _ECDSA)


class NonceCache:
    """Nonces already accepted, kept ``ttl_s`` seconds (default 600), at most ``max_entries``.

    ``use(nonce)`` raises ChallengeFailed on a repeat. When full, the oldest entries are
    dropped; nonces are 256-bit random, so a repeat after that is a replay, not chance,
    and the TTL should exceed the time a challenge is allowed to take.
    """

    def __init__(self, ttl_s: float = 600.0, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._seen: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def use(self, nonce: bytes, *, now: float | None = None) -> None:
        """Record ``nonce``; raise ChallengeFailed if it was recorded within the TTL."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._prune(now)
            if nonce in self._seen:
                raise ChallengeFailed("challenge nonce was already used (replay)")
            self._seen[nonce] = now

    def _prune(self, now: float) -> None:
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if at > now - self.ttl_s and len(self._seen) < self.max_entries:
                break
            del self._seen[oldest]


def verify_challenge(
    peer_cert: CertLike, nonce: bytes, context: bytes, signature: bytes, nonce_cache: NonceCache | None = None
) -> None:
    """Check the peer's ``signature`` over ``nonce`` (the one we sent) and ``context``.

    With ``nonce_cache``, a nonce is accepted once: the signature is checked first, then
    the nonce is recorded. Raises ChallengeFailed on a wrong-size nonce, a signature
    that does not verify with the peer certificate's key (wrong key, other context),
    or a replayed nonce.
    """
    if len(nonce) != CHALLENGE_BYTES:
        raise ChallengeFailed(f"challenge nonce must be {CHALLENGE_BYTES} bytes")
    try:
        as_cert(peer_cert).public_key().verify(signature, _challenge_message(nonce, context), _ECDSA)
    except (InvalidSignature, ValueError) as e:
        raise ChallengeFailed("challenge signature does not verify with the peer certificate") from e
    if nonce_cache is not None:
        nonce_cache.use(nonce)


# --- key and certificate files ------------------------------------------------------


def atomic_write(path: PathLike, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically with permissions ``mode``.

    A temporary file beside ``path`` is created with O_CREAT|O_EXCL|O_NOFOLLOW and
    ``mode`` (never wider, whatever the umask), written, fsynced, renamed over
    ``path``, and the directory fsynced. Raises OSError.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def check_private_file(path: PathLike) -> None:
    """Raise PKIError if ``path`` is readable or writable by group or others."""
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise PKIError(f"{path} has permissions {mode:o}; run chmod 600 on it")


def save_private_key(path: PathLike, key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> None:
    """Write ``key`` as PKCS #8 PEM (encrypted with ``passphrase`` if given) to ``path``, mode 0600."""
    encryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    atomic_write(path, data, mode=0o600)


def load_private_key(path: PathLike, passphrase: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """The P-256 private key in ``path``.

    Raises PKIError if the file is group/other-accessible, not a PEM key (or the
    passphrase is wrong), or not a P-256 key; OSError if unreadable.
    """
    check_private_file(path)
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=passphrase)
    except (ValueError, TypeError) as e:
        raise PKIError(f"{path} is not a usable PEM private key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _CURVE):
        raise PKIError(f"{path} is not an ECDSA P-256 key")
    return key


def save_certificate(path: PathLike, cert: CertLike) -> None:
    """Write a certificate as PEM to ``path`` atomically, mode 0644."""
    atomic_write(path, pem(as_cert(cert)), mode=0o644)


def load_certificate(path: PathLike) -> x509.Certificate:
    """The PEM certificate in ``path``. Raises PKIError on bad PEM, OSError if unreadable."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except ValueError as e:
        raise PKIError(f"{path} is not a PEM certificate: {e}") from e


def save_crl(path: PathLike, crl: CrlLike) -> None:
    """Write a CRL as PEM to ``path`` atomically, mode 0644."""
    atomic_write(path, pem(_as_crl(crl)), mode=0o644)


def load_crl(path: PathLike, ca_cert: CertLike) -> x509.CertificateRevocationList:
    """The PEM CRL in ``path``, verified against ``ca_cert``. Raises InvalidCRL, OSError."""
    return verify_crl(Path(path).read_bytes(), ca_cert)


# --- TLS 1.3 contexts ---------------------------------------------------------------


def _single_ca(ca_pem: CertLike) -> x509.Certificate:
    """The one CA certificate in ``ca_pem``; PKIError if it is a bundle or not a CA."""
    try:
        if isinstance(ca_pem, x509.Certificate):
            certs = [ca_pem]
        else:
            certs = x509.load_pem_x509_certificates(ca_pem.encode("ascii") if isinstance(ca_pem, str) else ca_pem)
        if len(certs) != 1:
            raise PKIError(f"ca_pem must hold exactly one CA certificate, found {len(certs)}")
        is_ca = certs[0].extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (ValueError, x509.ExtensionNotFound) as e:
        raise PKIError(f"ca_pem is not a PEM CA certificate: {e}") from e
    if not is_ca:
        raise PKIError("ca_pem is not a CA certificate")
    return certs[0]


def _load_identity(ctx: ssl.SSLContext, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | PathLike) -> None:
    """Give ``ctx`` our certificate and key.

    ssl only reads them from files, so they go into a private temporary directory
    (0700), the key encrypted under a one-time random password, and are deleted at once.
    """
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        key = load_private_key(key)
    password = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory(prefix="argus-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        atomic_write(cert_path, pem(cert), mode=0o600)
        atomic_write(key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        ), mode=0o600)
        ctx.load_cert_chain(cert_path, key_path, password=password)


def _load_crl(ctx: ssl.SSLContext, crl: x509.CertificateRevocationList) -> None:
    """Make OpenSSL check the peer's certificate against ``crl`` in the handshake.

    ``cadata`` takes certificates only, so the CRL is loaded from a temporary file.
    """
    with tempfile.TemporaryDirectory(prefix="argus-crl-") as tmp:
        path = Path(tmp) / "crl.pem"
        atomic_write(path, pem(crl), mode=0o600)
        ctx.load_verify_locations(cafile=path)
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def _configure(
    ctx: ssl.SSLContext, cert_pem: CertLike, key: ec.EllipticCurvePrivateKey | PathLike,
    ca_pem: CertLike, crl: CrlLike | None,
) -> ssl.SSLContext:
    """TLS 1.3 only, peer certificate required, the network CA as the only trust anchor."""
    ca_cert, cert = _single_ca(ca_pem), as_cert(cert_pem)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise PKIError("our certificate was not issued by this network CA") from e
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=pem(ca_cert).decode("ascii"))
    _load_identity(ctx, cert, key)
    if crl is not None:
        _load_crl(ctx, _current_crl(crl, ca_cert))
    return ctx


def _current_crl(crl: CrlLike, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    """The verified CRL; InvalidCRL if past its nextUpdate, since OpenSSL would then
    refuse every peer with "CRL has expired" (better said once, here)."""
    crl = verify_crl(crl, ca_cert)
    if crl.next_update_utc is None or crl.next_update_utc <= _utcnow():
        raise InvalidCRL(f"network CRL expired at {crl.next_update_utc}; the admin must re-sign it (refresh_crl)")
    return crl


def server_context(
    cert_pem: CertLike, key: ec.EllipticCurvePrivateKey | PathLike, ca_pem: CertLike, crl: CrlLike | None = None,
    *, allow_joiners: bool = False,
) -> ssl.SSLContext:
    """A TLS 1.3 server context that requires a client certificate from the network CA.

    PROTOCOL_TLS_SERVER, minimum = maximum = TLS 1.3 (RFC 8446), CERT_REQUIRED, only
    ``ca_pem`` trusted, VERIFY_X509_STRICT, no session tickets (every connection is a
    full handshake), and with ``crl`` VERIFY_CRL_CHECK_LEAF. ``key`` is a key or a key
    file path. Call ``peer_identity`` on each accepted connection.

    ``allow_joiners=True`` (a network's listening port) makes the client certificate
    optional: peers without one can only ask to join.

    Raises PKIError (``ca_pem`` not exactly one CA, our cert not issued by it, key
    file problems), InvalidCRL (not signed by the CA, or past its nextUpdate),
    ssl.SSLError (key does not match the certificate: KEY_VALUES_MISMATCH).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.num_tickets = 0
    _configure(ctx, cert_pem, key, ca_pem, crl)
    if allow_joiners:
        # CERT_OPTIONAL: a certificate, when presented, is still verified in full (a
        # bad one fails the handshake); a peer that presents none is a joiner, which
        # the daemon lets send only join_hello / join_request (protocol role table).
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(
    cert_pem: CertLike, key: ec.EllipticCurvePrivateKey | PathLike, ca_pem: CertLike, crl: CrlLike | None = None
) -> ssl.SSLContext:
    """A TLS 1.3 client context presenting our certificate and trusting only the network CA.

    As ``server_context``, with ``check_hostname=False``: node ids are not DNS names,
    so the caller checks the server with ``peer_identity(ssl_object,
    expected_node_id=...)`` right after the handshake (see the module docstring).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    return _configure(ctx, cert_pem, key, ca_pem, crl)


def joiner_context() -> ssl.SSLContext:
    """A TLS 1.3 client context for a joiner, which has no certificate and no CA yet.

    The server's certificate is not verified by OpenSSL here (the joiner does not
    have the CA): the joiner asks for the CA (``join_ca``), accepts it only if its
    fingerprint equals the one in the join token, and then checks the server's
    certificate with ``peer_identity(ssl_object, ca_cert=..., expected_role="admin")``
    before it sends the token. Until then it sends nothing secret.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def sign_data(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256/SHA-256 signature of ``data`` as raw r||s (64 bytes); e.g. the CA
    signing a network config (``protocol.config_signed_bytes``)."""
    return _sign_raw(key, data)


def verify_data(cert_or_key: CertLike | ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` (r||s, 64 bytes) over ``data`` verifies with the key of
    ``cert_or_key`` (a certificate or a public key)."""
    key = cert_or_key if isinstance(cert_or_key, ec.EllipticCurvePublicKey) else as_cert(cert_or_key).public_key()
    return _verify_raw(key, signature, data)


def peer_identity(
    ssl_object: ssl.SSLObject | ssl.SSLSocket,
    *,
    ca_cert: CertLike | None = None,
    crl: CrlLike | None = None,
    expected_node_id: str | None = None,
    expected_network_id: str | None = None,
    expected_role: str | None = None,
) -> NodeIdentity:
    """The NodeIdentity of the peer of a finished TLS handshake, after our own checks.

    Checks, each optional but the first: the peer sent a certificate; it was issued by
    ``ca_cert`` and is within its validity; it is not on ``crl`` (verified against
    ``ca_cert`` when given); it names ``expected_node_id`` / ``expected_network_id`` /
    ``expected_role``. The network id defaults to ``ca_cert``'s.

    Raises NotAuthenticated (no certificate, wrong issuer, expired, not an Argus node,
    unexpected node/network/role), CertificateRevoked, InvalidCRL.
    """
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise NotAuthenticated("peer presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    if ca_cert is not None:
        ca_cert = as_cert(ca_cert)
        _check_issued_and_current(cert, ca_cert)
        expected_network_id = expected_network_id or network_of(ca_cert)
    identity = node_identity(cert)
    if crl is not None and is_revoked(crl, cert, ca_cert):
        raise CertificateRevoked(f"node {identity.node_id!r} has been revoked (serial {cert.serial_number:x})")
    for field, expected in (("node_id", expected_node_id), ("network_id", expected_network_id), ("role", expected_role)):
        if expected is not None and getattr(identity, field) != expected:
            raise NotAuthenticated(f"peer {field} is {getattr(identity, field)!r}, expected {expected!r}")
    return identity


def _check_issued_and_current(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise NotAuthenticated("peer certificate was not issued by this network CA") from e
    now = _utcnow()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise NotAuthenticated("peer certificate is outside its validity period")
