"""Mutual TLS 1.3 between network nodes, on real sockets on 127.0.0.1.

The server is asyncio's ``start_server`` upgrading each connection with
``StreamWriter.start_tls(pki.server_context(...))`` (and, once, the ``websockets``
library's ``serve(ssl=...)``). After the handshake each side calls
``pki.peer_identity`` and the two run the challenge-response over the connection.

A refused peer must fail in the TLS handshake, never by timing out: every test is
bounded. asyncio's SSL transport aborts a failed server handshake without flushing
the TLS alert (sslproto ``_do_handshake`` -> ``_fatal_error``), so the refused
client sees EOF or a reset rather than the alert; the tests therefore also assert
the server's own handshake error (ssl.SSLError and its reason).
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
from dataclasses import dataclass, field

import pytest
import websockets
from cryptography import x509
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve

from worker import pki

NET = "network_001"
TIMEOUT_S = 5
# What a client refused by an asyncio server sees: the alert, a reset, or EOF (see above).
REFUSED = (ssl.SSLError, ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError)


@dataclass
class Node:
    node_id: str
    key: object
    cert_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def enroll(ca, node_id: str, role: str = "worker", **kwargs) -> Node:
    ca_key, ca_cert = ca
    key = pki.new_node_key()
    csr = pki.make_csr(key, node_id, pki.network_of(ca_cert))
    return Node(node_id, key, pki.sign_node_certificate(ca_key, ca_cert, csr, node_id, role, **kwargs))


@pytest.fixture(scope="module")
def ca():
    return pki.create_network_ca(NET, "Home lab")


@pytest.fixture(scope="module")
def ca_pem(ca):
    return pki.pem(ca[1])


@pytest.fixture(scope="module")
def admin(ca):
    return enroll(ca, "admin-1", "admin")


@pytest.fixture(scope="module")
def worker(ca):
    return enroll(ca, "worker-1")


# --- a tiny node protocol over the TLS stream: nonces, then signatures ---------------


async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(len(data).to_bytes(2, "big") + data)
    await writer.drain()


async def receive(reader: asyncio.StreamReader) -> bytes:
    size = int.from_bytes(await reader.readexactly(2), "big")
    return await reader.readexactly(size)


def context_for(client_cert, server_cert, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return pki.challenge_context(NET, pki.certificate_fingerprint(client_cert),
                                 pki.certificate_fingerprint(server_cert), client_nonce, server_nonce)


@dataclass
class ServerLog:
    """What the test server saw: handshake errors, identities it authenticated, and
    PKI errors it refused with after the handshake; ``crl`` is its current CRL."""

    handshake_errors: list = field(default_factory=list)
    identities: list = field(default_factory=list)
    refusals: list = field(default_factory=list)
    crl: object = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def node_server(me: Node, ca_cert: x509.Certificate, server_ctx: ssl.SSLContext):
    """A node server on 127.0.0.1:<random port>; yields (port, ServerLog)."""
    log = ServerLog()
    nonces = pki.NonceCache()

    async def handle(reader, writer):
        try:
            await writer.start_tls(server_ctx, ssl_handshake_timeout=TIMEOUT_S)
        except (ssl.SSLError, ConnectionError) as e:
            log.handshake_errors.append(e)
        else:
            await authenticate(reader, writer)
        finally:
            writer.close()
            log.finished.set()

    async def authenticate(reader, writer):
        ssl_object = writer.get_extra_info("ssl_object")
        try:
            peer = pki.peer_identity(ssl_object, ca_cert=ca_cert, crl=log.crl)
            peer_cert = x509.load_der_x509_certificate(ssl_object.getpeercert(True))
            server_nonce = pki.make_challenge()
            await send(writer, server_nonce)
            client_nonce = await receive(reader)
            context = context_for(peer_cert, me.cert, client_nonce, server_nonce)
            pki.verify_challenge(peer_cert, server_nonce, context, await receive(reader), nonces)
            await send(writer, pki.sign_challenge(me.key, client_nonce, context))
            log.identities.append(peer)
        except pki.PKIError as e:
            log.refusals.append(e)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], log
    finally:
        server.close()
        await server.wait_closed()


async def client_session(port: int, me: Node, ca_cert: x509.Certificate, client_ctx: ssl.SSLContext,
                         expected_server: str = "admin-1") -> pki.NodeIdentity:
    """Connect, check the server's identity, run the challenge-response; the server's NodeIdentity."""
    async with asyncio.timeout(TIMEOUT_S):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            assert ssl_object.version() == "TLSv1.3"
            server = pki.peer_identity(ssl_object, ca_cert=ca_cert, expected_node_id=expected_server)
            server_cert = x509.load_der_x509_certificate(ssl_object.getpeercert(True))
            server_nonce = await receive(reader)
            client_nonce = pki.make_challenge()
            await send(writer, client_nonce)
            context = context_for(me.cert, server_cert, client_nonce, server_nonce)
            await send(writer, pki.sign_challenge(me.key, server_nonce, context))
            pki.verify_challenge(server_cert, client_nonce, context, await receive(reader))
            return server
        finally:
            writer.close()


async def attempt(port: int, client_ctx: ssl.SSLContext) -> bytes:
    """Connect and read the server's first frame header; raises what the connection raises."""
    async with asyncio.timeout(TIMEOUT_S):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        try:
            return await reader.readexactly(2)
        finally:
            writer.close()


async def refused_by_server(port: int, log: ServerLog, client_ctx: ssl.SSLContext) -> ssl.SSLError:
    """Connect with ``client_ctx``, expect a prompt refusal; the server's handshake error."""
    with pytest.raises(REFUSED):
        await attempt(port, client_ctx)
    await asyncio.wait_for(log.finished.wait(), TIMEOUT_S)
    assert not log.identities and not log.refusals
    [error] = log.handshake_errors
    assert isinstance(error, ssl.SSLError)
    return error


def raw_client_context(node: Node | None, trust_pem: bytes, **settings) -> ssl.SSLContext:
    """A TLS client context built by hand, to present what pki.client_context refuses to."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    for name, value in settings.items():
        setattr(ctx, name, value)
    ctx.load_verify_locations(cadata=trust_pem.decode())
    if node is not None:
        pki._load_identity(ctx, node.cert, node.key)
    return ctx


# --- accepted -----------------------------------------------------------------------


async def test_member_connects_and_both_sides_see_each_others_identity(ca, ca_pem, admin, worker):
    async with node_server(admin, ca[1], pki.server_context(admin.cert_pem, admin.key, ca_pem)) as (port, log):
        client_ctx = pki.client_context(worker.cert_pem, worker.key, ca_pem)
        seen_by_client = await client_session(port, worker, ca[1], client_ctx)
        await asyncio.wait_for(log.finished.wait(), TIMEOUT_S)
    assert seen_by_client == pki.node_identity(admin.cert_pem)
    assert log.identities == [pki.node_identity(worker.cert_pem)]
    assert not log.refusals and not log.handshake_errors
    assert (seen_by_client.role, log.identities[0].role) == ("admin", "worker")


async def test_contexts_accept_key_and_crl_files(ca, ca_pem, admin, worker, tmp_path):
    pki.save_private_key(tmp_path / "admin.key", admin.key)
    pki.save_crl(tmp_path / "crl.pem", pki.new_crl(*ca))
    crl = pki.load_crl(tmp_path / "crl.pem", ca[1])
    server_ctx = pki.server_context(admin.cert_pem, tmp_path / "admin.key", ca_pem, crl)
    async with node_server(admin, ca[1], server_ctx) as (port, log):
        await client_session(port, worker, ca[1], pki.client_context(worker.cert_pem, worker.key, ca_pem, crl))
        await asyncio.wait_for(log.finished.wait(), TIMEOUT_S)
    assert [i.node_id for i in log.identities] == ["worker-1"]


# --- refused in the handshake -------------------------------------------------------


async def test_client_without_a_certificate_is_refused(ca, ca_pem, admin):
    async with node_server(admin, ca[1], pki.server_context(admin.cert_pem, admin.key, ca_pem)) as (port, log):
        error = await refused_by_server(port, log, raw_client_context(None, ca_pem))
    assert error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"


async def test_certificate_from_another_networks_ca_is_refused(ca, ca_pem, admin):
    stranger = enroll(pki.create_network_ca("network_002", "Neighbour"), "worker-1")
    async with node_server(admin, ca[1], pki.server_context(admin.cert_pem, admin.key, ca_pem)) as (port, log):
        error = await refused_by_server(port, log, raw_client_context(stranger, ca_pem))
    assert isinstance(error, ssl.SSLCertVerificationError)
    assert error.verify_message == "unable to get local issuer certificate"


async def test_server_from_another_network_is_refused_by_the_client(ca_pem, worker):
    other = pki.create_network_ca("network_002", "Neighbour")
    impostor = enroll(other, "admin-1", "admin")
    server_ctx = pki.server_context(impostor.cert_pem, impostor.key, pki.pem(other[1]))
    async with node_server(impostor, other[1], server_ctx) as (port, log):
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            await attempt(port, pki.client_context(worker.cert_pem, worker.key, ca_pem))
        await asyncio.wait_for(log.finished.wait(), TIMEOUT_S)
    assert not log.identities


async def test_expired_certificate_is_refused(ca, ca_pem, admin):
    two_years_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=730)
    expired = enroll(ca, "worker-old", validity_days=365, now=two_years_ago)
    assert expired.cert.not_valid_after_utc < dt.datetime.now(dt.UTC)
    async with node_server(admin, ca[1], pki.server_context(admin.cert_pem, admin.key, ca_pem)) as (port, log):
        error = await refused_by_server(port, log, pki.client_context(expired.cert_pem, expired.key, ca_pem))
    assert error.verify_message == "certificate has expired"


async def test_revoked_certificate_is_refused_in_the_handshake(ca, ca_pem, admin):
    revoked = enroll(ca, "worker-gone")
    crl = pki.revoke(*ca, None, revoked.cert.serial_number)
    server_ctx = pki.server_context(admin.cert_pem, admin.key, ca_pem, crl)
    async with node_server(admin, ca[1], server_ctx) as (port, log):
        error = await refused_by_server(port, log, pki.client_context(revoked.cert_pem, revoked.key, ca_pem))
    assert error.verify_message == "certificate revoked"


async def test_unrevoked_member_still_connects_to_a_server_holding_a_crl(ca, ca_pem, admin, worker):
    crl = pki.revoke(*ca, None, enroll(ca, "worker-gone").cert.serial_number)
    server_ctx = pki.server_context(admin.cert_pem, admin.key, ca_pem, crl)
    async with node_server(admin, ca[1], server_ctx) as (port, log):
        await client_session(port, worker, ca[1], pki.client_context(worker.cert_pem, worker.key, ca_pem, crl))
        await asyncio.wait_for(log.finished.wait(), TIMEOUT_S)
    assert [i.node_id for i in log.identities] == ["worker-1"]


async def test_revoked_server_is_refused_by_a_client_holding_the_crl(ca, ca_pem, worker):
    revoked_admin = enroll(ca, "admin-1", "admin")
    crl = pki.revoke(*ca, None, revoked_admin.cert.serial_number)
    server_ctx = pki.server_context(revoked_admin.cert_pem, revoked_admin.key, ca_pem)
    async with node_server(revoked_admin, ca[1], server_ctx) as (port, log):
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate revoked"):
            await attempt(port, pki.client_context(worker.cert_pem, worker.key, ca_pem, crl))
        await asyncio.wait_for(log.finished.wait(), TIMEOUT_S)
    assert not log.identities


async def test_tls12_only_client_is_refused(ca, ca_pem, admin, worker):
    old_client = raw_client_context(worker, ca_pem, maximum_version=ssl.TLSVersion.TLSv1_2)
    async with node_server(admin, ca[1], pki.server_context(admin.cert_pem, admin.key, ca_pem)) as (port, log):
        error = await refused_by_server(port, log, old_client)
    assert error.reason == "UNSUPPORTED_PROTOCOL"


def test_contexts_refuse_an_expired_crl_instead_of_refusing_every_peer(ca, ca_pem, admin):
    stale = pki.new_crl(*ca, validity_days=0)  # nextUpdate = now
    with pytest.raises(pki.InvalidCRL, match="refresh_crl"):
        pki.server_context(admin.cert_pem, admin.key, ca_pem, stale)
    with pytest.raises(pki.InvalidCRL, match="refresh_crl"):
        pki.client_context(admin.cert_pem, admin.key, ca_pem, stale)


def test_contexts_refuse_a_crl_from_another_ca(ca_pem, admin):
    foreign = pki.new_crl(*pki.create_network_ca("network_002", "Neighbour"))
    with pytest.raises(pki.InvalidCRL):
        pki.server_context(admin.cert_pem, admin.key, ca_pem, foreign)


def test_contexts_refuse_a_certificate_from_another_ca_and_a_bundle_of_cas(ca_pem, admin):
    other_ca_pem = pki.pem(pki.create_network_ca("network_002", "Neighbour")[1])
    with pytest.raises(pki.PKIError, match="not issued by this network CA"):
        pki.server_context(admin.cert_pem, admin.key, other_ca_pem)
    with pytest.raises(pki.PKIError, match="exactly one CA"):
        pki.client_context(admin.cert_pem, admin.key, ca_pem + other_ca_pem)


# --- refused after the handshake ----------------------------------------------------


async def test_revocation_after_the_context_was_built_is_caught_after_the_handshake(ca, ca_pem, admin):
    node = enroll(ca, "worker-late")
    async with node_server(admin, ca[1], pki.server_context(admin.cert_pem, admin.key, ca_pem)) as (port, log):
        log.crl = pki.revoke(*ca, None, node.cert.serial_number)
        with pytest.raises(asyncio.IncompleteReadError):
            await attempt(port, pki.client_context(node.cert_pem, node.key, ca_pem))
        await asyncio.wait_for(log.finished.wait(), TIMEOUT_S)
    assert not log.identities and not log.handshake_errors
    assert [type(e) for e in log.refusals] == [pki.CertificateRevoked]


async def test_member_posing_as_another_node_is_refused_by_the_identity_check(ca, ca_pem, worker):
    other_member = enroll(ca, "worker-2")
    server_ctx = pki.server_context(other_member.cert_pem, other_member.key, ca_pem)
    async with node_server(other_member, ca[1], server_ctx) as (port, _):
        with pytest.raises(pki.NotAuthenticated, match="worker-2"):
            await client_session(port, worker, ca[1], pki.client_context(worker.cert_pem, worker.key, ca_pem),
                                 expected_server="admin-1")


# --- the websockets library ---------------------------------------------------------


async def test_websocket_server_accepts_a_member_and_refuses_a_client_without_certificate(ca, ca_pem, admin, worker):
    seen = []

    async def handler(connection):
        seen.append(pki.peer_identity(connection.transport.get_extra_info("ssl_object"), ca_cert=ca[1]))
        await connection.send(seen[-1].node_id)

    server_ctx = pki.server_context(admin.cert_pem, admin.key, ca_pem)
    async with asyncio.timeout(TIMEOUT_S):
        async with ws_serve(handler, "127.0.0.1", 0, ssl=server_ctx) as server:
            url = f"wss://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
            client_ctx = pki.client_context(worker.cert_pem, worker.key, ca_pem)
            async with ws_connect(url, ssl=client_ctx, proxy=None, open_timeout=TIMEOUT_S) as ws:
                server_identity = pki.peer_identity(ws.transport.get_extra_info("ssl_object"), ca_cert=ca[1],
                                                    expected_node_id="admin-1")
                echoed = await ws.recv()
            with pytest.raises((websockets.exceptions.InvalidHandshake, *REFUSED)):
                async with ws_connect(url, ssl=raw_client_context(None, ca_pem), proxy=None,
                                      open_timeout=TIMEOUT_S):
                    pass
    assert echoed == "worker-1" and server_identity.node_id == "admin-1"
    assert [i.node_id for i in seen] == ["worker-1"]
