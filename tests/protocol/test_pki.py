"""Network PKI: CA, CSR, node certificates, CRL, join tokens, challenge-response, key files.

Real cryptography throughout (ECDSA P-256 keys made per test); no network.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import stat
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from worker import pki

NET = "network_001"


@pytest.fixture(scope="module")
def ca():
    return pki.create_network_ca(NET, "Home lab")


@pytest.fixture(scope="module")
def other_ca():
    return pki.create_network_ca("network_002", "Neighbour")


def issue(ca, node_id="node-a", role="worker", **kwargs):
    """(node key, node certificate) issued by ``ca``."""
    ca_key, ca_cert = ca
    key = pki.new_node_key()
    csr = pki.make_csr(key, node_id, pki.network_of(ca_cert))
    cert_pem = pki.sign_node_certificate(ca_key, ca_cert, csr, node_id, role, **kwargs)
    return key, x509.load_pem_x509_certificate(cert_pem)


def attr(name: x509.Name, oid) -> str:
    return name.get_attributes_for_oid(oid)[0].value


# --- CA and node certificates -------------------------------------------------------


def test_network_ca_is_a_self_signed_p256_ca_limited_to_signing_node_certificates(ca):
    _, cert = ca
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert isinstance(cert.public_key().curve, ec.SECP256R1)
    assert cert.issuer == cert.subject and attr(cert.subject, NameOID.ORGANIZATION_NAME) == NET
    cert.verify_directly_issued_by(cert)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > dt.timedelta(days=9 * 365)


def test_ca_fingerprint_is_sha256_of_der_in_hex(ca):
    _, cert = ca
    der = cert.public_bytes(serialization.Encoding.DER)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    assert pki.ca_fingerprint(cert) == digest.finalize().hex()
    assert pki.ca_fingerprint(pki.pem(cert)) == pki.ca_fingerprint(cert)


def test_csr_carries_node_id_and_network_and_is_self_signed():
    key = pki.new_node_key()
    csr = x509.load_pem_x509_csr(pki.make_csr(key, "node-a", NET))
    assert csr.is_signature_valid
    assert attr(csr.subject, NameOID.COMMON_NAME) == "node-a"
    assert attr(csr.subject, NameOID.ORGANIZATION_NAME) == NET


def test_node_certificate_names_node_network_and_role_for_mutual_tls(ca):
    _, cert = issue(ca, "node-a", "backup")
    assert attr(cert.subject, NameOID.COMMON_NAME) == "node-a"
    assert attr(cert.subject, NameOID.ORGANIZATION_NAME) == NET
    assert attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME) == "backup"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:argus:node:node-a"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca[1])


def test_node_certificates_get_distinct_random_serials(ca):
    serials = {issue(ca)[1].serial_number for _ in range(4)}
    assert len(serials) == 4 and all(s.bit_length() > 64 for s in serials)


def test_node_certificate_lasts_validity_days(ca):
    _, cert = issue(ca, validity_days=30)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30, minutes=10)


def test_node_identity_reads_node_role_network_fingerprint_and_expiry(ca):
    _, cert = issue(ca, "node-b", "admin")
    identity = pki.node_identity(pki.pem(cert))
    assert identity == pki.NodeIdentity(
        "node-b", "admin", NET, pki.certificate_fingerprint(cert), cert.not_valid_after_utc
    )


def test_ca_certificate_is_not_a_node_identity(ca):
    with pytest.raises(pki.NotAuthenticated):
        pki.node_identity(ca[1])


def test_csr_with_a_bad_signature_is_refused(ca):
    ca_key, ca_cert = ca
    csr_pem = pki.make_csr(pki.new_node_key(), "node-a", NET)
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature BIT STRING
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(pki.InvalidCSR, match="signature"):
        pki.sign_node_certificate(ca_key, ca_cert, forged, "node-a", "worker")


def test_csr_for_another_node_or_network_is_refused(ca):
    ca_key, ca_cert = ca
    key = pki.new_node_key()
    with pytest.raises(pki.InvalidCSR):
        pki.sign_node_certificate(ca_key, ca_cert, pki.make_csr(key, "node-x", NET), "node-a", "worker")
    with pytest.raises(pki.InvalidCSR):
        pki.sign_node_certificate(ca_key, ca_cert, pki.make_csr(key, "node-a", "network_002"), "node-a", "worker")


def test_csr_with_a_non_p256_key_is_refused(ca):
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(pki.InvalidCSR, match="P-256"):
        pki.sign_node_certificate(ca_key, ca_cert, pki.make_csr(key, "node-a", NET), "node-a", "worker")


def test_unknown_role_is_refused(ca):
    ca_key, ca_cert = ca
    csr = pki.make_csr(pki.new_node_key(), "node-a", NET)
    with pytest.raises(ValueError, match="role"):
        pki.sign_node_certificate(ca_key, ca_cert, csr, "node-a", "root")


# --- revocation ---------------------------------------------------------------------


def test_revoked_certificate_is_on_the_crl_and_others_are_not(ca):
    ca_key, ca_cert = ca
    _, revoked = issue(ca, "node-r")
    _, kept = issue(ca, "node-k")
    crl = pki.revoke(ca_key, ca_cert, pki.new_crl(ca_key, ca_cert), revoked.serial_number)
    assert pki.is_revoked(crl, revoked, ca_cert)
    assert not pki.is_revoked(crl, kept, ca_cert)


def test_revoking_again_keeps_earlier_entries_and_counts_up(ca):
    ca_key, ca_cert = ca
    _, first = issue(ca, "node-1")
    _, second = issue(ca, "node-2")
    crl1 = pki.revoke(ca_key, ca_cert, None, first.serial_number)
    crl2 = pki.revoke(ca_key, ca_cert, pki.pem(crl1), second.serial_number)
    assert pki.is_revoked(crl2, first, ca_cert) and pki.is_revoked(crl2, second, ca_cert)
    number = crl2.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == 2


def test_crl_round_trips_through_its_file(ca, tmp_path):
    ca_key, ca_cert = ca
    _, cert = issue(ca)
    pki.save_crl(tmp_path / "crl.pem", pki.revoke(ca_key, ca_cert, None, cert.serial_number))
    assert pki.is_revoked(pki.load_crl(tmp_path / "crl.pem", ca_cert), cert)


def test_crl_signed_by_another_key_is_refused(ca, other_ca):
    ca_key, ca_cert = ca
    _, cert = issue(ca)
    forger = ec.generate_private_key(ec.SECP256R1())
    forged = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(dt.datetime.now(dt.UTC))
        .next_update(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
        .sign(forger, hashes.SHA256())
    )
    with pytest.raises(pki.InvalidCRL, match="signature"):
        pki.is_revoked(forged, cert, ca_cert)
    with pytest.raises(pki.InvalidCRL):
        pki.revoke(ca_key, ca_cert, forged, cert.serial_number)
    with pytest.raises(pki.InvalidCRL, match="issuer"):
        pki.verify_crl(pki.new_crl(*other_ca), ca_cert)


def test_refreshed_crl_keeps_entries_and_extends_next_update(ca):
    ca_key, ca_cert = ca
    _, cert = issue(ca)
    crl = pki.revoke(ca_key, ca_cert, None, cert.serial_number, validity_days=1)
    fresh = pki.refresh_crl(ca_key, ca_cert, crl)
    assert pki.is_revoked(fresh, cert, ca_cert)
    assert fresh.next_update_utc > crl.next_update_utc + dt.timedelta(days=300)


# --- join tokens --------------------------------------------------------------------


def token_for(ca, **kwargs):
    ca_key, ca_cert = ca
    return pki.issue_join_token(ca_key, pki.network_of(ca_cert), "192.168.1.10:7443", pki.ca_fingerprint(ca_cert),
                                **kwargs)


def test_join_token_is_url_safe_and_parses_without_any_secret(ca):
    token = token_for(ca)
    claims = pki.parse_join_token(token)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    assert len(token) < 400
    assert (claims.network_id, claims.admin_host, claims.admin_port) == (NET, "192.168.1.10", 7443)
    assert claims.ca_fingerprint == pki.ca_fingerprint(ca[1])
    assert claims.expires_at - time.time() == pytest.approx(900, abs=5)


def test_join_token_redeems_once_with_its_claims(ca, tmp_path):
    token = token_for(ca)
    registry = pki.TokenRegistry(tmp_path / "tokens.json", ca[1])
    assert registry.redeem(token) == pki.parse_join_token(token)
    assert stat.S_IMODE(os.stat(tmp_path / "tokens.json").st_mode) == 0o600


def test_second_redemption_of_a_join_token_is_refused(ca, tmp_path):
    token = token_for(ca)
    registry = pki.TokenRegistry(tmp_path / "tokens.json", ca[1])
    registry.redeem(token)
    with pytest.raises(pki.TokenReused):
        registry.redeem(token)


def test_used_join_token_stays_used_after_the_admin_restarts(ca, tmp_path):
    token = token_for(ca)
    pki.TokenRegistry(tmp_path / "tokens.json", ca[1]).redeem(token)
    with pytest.raises(pki.TokenReused):
        pki.TokenRegistry(tmp_path / "tokens.json", ca[1]).redeem(token)


def test_expired_join_token_is_refused(ca, tmp_path):
    token = token_for(ca, ttl_s=60, now=time.time() - 61)
    with pytest.raises(pki.TokenExpired):
        pki.TokenRegistry(tmp_path / "tokens.json", ca[1]).redeem(token)


def test_eight_threads_redeeming_one_token_exactly_one_wins(ca, tmp_path):
    token = token_for(ca)
    registry = pki.TokenRegistry(tmp_path / "tokens.json", ca[1])
    start = threading.Barrier(8)
    outcomes: list[str] = []

    def redeem() -> None:
        start.wait(timeout=5)
        try:
            registry.redeem(token)
            outcomes.append("won")
        except pki.TokenReused:
            outcomes.append("reused")

    threads = [threading.Thread(target=redeem) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(outcomes) == ["reused"] * 7 + ["won"]


def test_tampered_join_token_is_refused(ca, tmp_path):
    prefix, body, signature = token_for(ca).split(".")
    claims = json.loads(pki._unb64u(body))
    claims["adm"] = "10.6.6.6:7443"
    tampered = ".".join([prefix, pki._b64u(json.dumps(claims).encode()), signature])
    registry = pki.TokenRegistry(tmp_path / "tokens.json", ca[1])
    with pytest.raises(pki.TokenInvalid):
        registry.redeem(tampered)
    with pytest.raises(pki.TokenInvalid):
        registry.redeem(token_for(ca)[:-4] + "AAAA")
    with pytest.raises(pki.TokenInvalid):
        registry.redeem("not-a-token")


def test_another_networks_join_token_is_refused(ca, other_ca, tmp_path):
    registry = pki.TokenRegistry(tmp_path / "tokens.json", ca[1])
    with pytest.raises(pki.TokenInvalid):
        registry.redeem(token_for(other_ca))


# --- challenge-response -------------------------------------------------------------


@pytest.fixture()
def handshake(ca):
    """Both nodes' keys and certificates, their nonces and the shared connection context."""
    client_key, client_cert = issue(ca, "node-c")
    server_key, server_cert = issue(ca, "node-s")
    client_nonce, server_nonce = pki.make_challenge(), pki.make_challenge()
    context = pki.challenge_context(NET, pki.certificate_fingerprint(client_cert),
                                    pki.certificate_fingerprint(server_cert), client_nonce, server_nonce)
    return {"client_key": client_key, "client_cert": client_cert, "server_key": server_key,
            "server_cert": server_cert, "client_nonce": client_nonce, "server_nonce": server_nonce,
            "context": context}


def test_challenge_is_32_random_bytes():
    assert len(pki.make_challenge()) == 32 and pki.make_challenge() != pki.make_challenge()


def test_peer_signature_over_our_nonce_and_the_connection_context_verifies(handshake):
    h = handshake
    signature = pki.sign_challenge(h["client_key"], h["server_nonce"], h["context"])
    pki.verify_challenge(h["client_cert"], h["server_nonce"], h["context"], signature, pki.NonceCache())


def test_challenge_signed_with_another_key_fails(handshake):
    h = handshake
    signature = pki.sign_challenge(pki.new_node_key(), h["server_nonce"], h["context"])
    with pytest.raises(pki.ChallengeFailed):
        pki.verify_challenge(h["client_cert"], h["server_nonce"], h["context"], signature)


def test_replayed_challenge_nonce_is_refused(handshake):
    h = handshake
    cache = pki.NonceCache()
    signature = pki.sign_challenge(h["client_key"], h["server_nonce"], h["context"])
    pki.verify_challenge(h["client_cert"], h["server_nonce"], h["context"], signature, cache)
    with pytest.raises(pki.ChallengeFailed, match="replay"):
        pki.verify_challenge(h["client_cert"], h["server_nonce"], h["context"], signature, cache)


def test_signature_made_for_another_connection_fails(handshake):
    h = handshake
    other_context = pki.challenge_context(NET, pki.certificate_fingerprint(h["client_cert"]),
                                          pki.certificate_fingerprint(h["server_cert"]),
                                          pki.make_challenge(), h["server_nonce"])
    signature = pki.sign_challenge(h["client_key"], h["server_nonce"], other_context)
    with pytest.raises(pki.ChallengeFailed):
        pki.verify_challenge(h["client_cert"], h["server_nonce"], h["context"], signature)


def test_signature_relayed_through_a_third_node_fails(handshake, ca):
    h = handshake
    _, relay_cert = issue(ca, "node-m")
    relayed_context = pki.challenge_context(NET, pki.certificate_fingerprint(h["client_cert"]),
                                            pki.certificate_fingerprint(relay_cert),
                                            h["client_nonce"], h["server_nonce"])
    signature = pki.sign_challenge(h["client_key"], h["server_nonce"], relayed_context)
    with pytest.raises(pki.ChallengeFailed):
        pki.verify_challenge(h["client_cert"], h["server_nonce"], h["context"], signature)


def test_nonce_cache_forgets_nonces_after_its_ttl():
    cache = pki.NonceCache(ttl_s=10)
    nonce = pki.make_challenge()
    cache.use(nonce, now=100.0)
    cache.use(nonce, now=111.0)
    with pytest.raises(pki.ChallengeFailed):
        cache.use(nonce, now=112.0)


# --- key files ----------------------------------------------------------------------


def test_private_key_file_is_0600_and_loads_back(tmp_path):
    old_umask = os.umask(0)
    try:
        key = pki.new_node_key()
        pki.save_private_key(tmp_path / "node.key", key)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(tmp_path / "node.key").st_mode) == 0o600
    loaded = pki.load_private_key(tmp_path / "node.key")
    assert loaded.private_numbers() == key.private_numbers()
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]


def test_private_key_saved_with_passphrase_needs_it(tmp_path):
    key = pki.new_node_key()
    pki.save_private_key(tmp_path / "node.key", key, passphrase=b"correct horse")
    assert b"ENCRYPTED" in (tmp_path / "node.key").read_bytes()
    assert pki.load_private_key(tmp_path / "node.key", b"correct horse").private_numbers() == key.private_numbers()
    with pytest.raises(pki.PKIError):
        pki.load_private_key(tmp_path / "node.key", b"wrong")


def test_saving_a_key_replaces_the_old_file_atomically(tmp_path):
    pki.save_private_key(tmp_path / "node.key", pki.new_node_key())
    key = pki.new_node_key()
    pki.save_private_key(tmp_path / "node.key", key)
    assert pki.load_private_key(tmp_path / "node.key").private_numbers() == key.private_numbers()
    assert stat.S_IMODE(os.stat(tmp_path / "node.key").st_mode) == 0o600


def test_group_readable_key_file_is_refused(tmp_path):
    pki.save_private_key(tmp_path / "node.key", pki.new_node_key())
    os.chmod(tmp_path / "node.key", 0o640)
    with pytest.raises(pki.PKIError, match="chmod 600"):
        pki.load_private_key(tmp_path / "node.key")


def test_certificate_round_trips_through_its_file(ca, tmp_path):
    _, cert = issue(ca)
    pki.save_certificate(tmp_path / "node.pem", cert)
    assert pki.load_certificate(tmp_path / "node.pem") == cert
