"""The opening of a connection (worker/protocol/handshake.py): message order from both ends,
and the challenge and join payloads carrying real worker/pki.py material.
"""
from __future__ import annotations

import base64

import pytest

from worker.protocol import (
    Handshake,
    UnexpectedMessage,
    encode_message,
    make_message,
)

from tests.protocol.samples import (
    CONFIG,
    NET,
    NOW,
    RESOURCES,
    decode,
)

MEMBER_OPENING = [(True, "hello"), (False, "challenge"), (True, "challenge"), (True, "challenge_response"),
                  (False, "challenge_response")]  # (sent by the initiator?, type)


def test_member_handshake_in_order_from_both_ends():
    client, server = Handshake(initiator=True), Handshake(initiator=False)
    for by_initiator, t in MEMBER_OPENING:
        assert not client.authenticated and not server.authenticated
        sender, receiver = (client, server) if by_initiator else (server, client)
        sender.sent(t)
        receiver.received(t)
    assert client.authenticated and server.authenticated
    server.received("heartbeat")
    server.received("forward")


@pytest.mark.parametrize("events", [
    [("received", "heartbeat")],  # before hello
    [("received", "challenge")],  # wrong first message
    [("received", "hello"), ("received", "challenge")],  # the responder's challenge comes first
    [("received", "hello"), ("sent", "challenge"), ("received", "challenge_response")],  # no nonce of its own
    [("received", "hello"), ("sent", "challenge"), ("received", "challenge"), ("sent", "challenge_response")],
    [("received", "hello"), ("sent", "challenge"), ("received", "hello")],
    [("received", "hello"), ("sent", "challenge"), ("received", "challenge"), ("received", "challenge_response"),
     ("sent", "challenge_response"), ("received", "hello")],  # no second opening
    [("received", "join_request"), ("received", "heartbeat")],
    [("received", "join_request"), ("sent", "join_approved"), ("received", "join_request")],
])
def test_handshake_out_of_order_is_unexpected(events):
    server = Handshake(initiator=False)
    with pytest.raises(UnexpectedMessage) as ei:
        for direction, t in events:
            getattr(server, direction)(t)
    assert ei.value.code == "unexpected_message"


def test_join_handshake_and_errors_in_any_state():
    server = Handshake(initiator=False)
    server.received("join_request")
    server.sent("join_pending")
    server.sent("error")
    server.sent("join_pending")
    server.sent("join_approved")
    assert server.state == "joined" and not server.authenticated


def test_challenges_carry_the_pki_nonces_and_signatures_both_ways():
    """The payloads hold what worker/pki.py makes: 32-byte nonces, ECDSA P-256 signatures over its context."""
    from worker import pki

    ca_key, ca_cert = pki.create_network_ca(NET, "Test network")
    nodes = {}
    for node_id, role in (("node-a", "worker"), ("admin-1", "admin")):
        key = pki.new_node_key()
        nodes[node_id] = key, pki.sign_node_certificate(ca_key, ca_cert, pki.make_csr(key, node_id, NET), node_id, role)
    (c_key, c_cert), (s_key, s_cert) = nodes["node-a"], nodes["admin-1"]

    def over_the_wire(message_type, payload):
        return decode(encode_message(make_message(message_type, payload, network_id=NET, timestamp=NOW))).payload

    b64, unb64 = (lambda b: base64.b64encode(b).decode()), base64.b64decode
    server_nonce = unb64(over_the_wire("challenge", {"nonce": b64(pki.make_challenge())})["nonce"])
    client_nonce = unb64(over_the_wire("challenge", {"nonce": b64(pki.make_challenge())})["nonce"])
    context = pki.challenge_context(NET, pki.certificate_fingerprint(c_cert), pki.certificate_fingerprint(s_cert),
                                    client_nonce, server_nonce)
    c_sig = over_the_wire("challenge_response", {"signature": b64(pki.sign_challenge(c_key, server_nonce, context))})
    pki.verify_challenge(c_cert, server_nonce, context, unb64(c_sig["signature"]))
    s_sig = over_the_wire("challenge_response", {"signature": b64(pki.sign_challenge(s_key, client_nonce, context))})
    pki.verify_challenge(s_cert, client_nonce, context, unb64(s_sig["signature"]))


def test_join_messages_carry_real_pki_material():
    from worker import pki

    ca_key, ca_cert = pki.create_network_ca(NET, "Test network")
    token = pki.issue_join_token(ca_key, NET, "[fd00::1]:8765", pki.ca_fingerprint(ca_cert))
    csr = pki.make_csr(pki.new_node_key(), "node-" + "x" * 59, NET).decode()
    req = decode(encode_message(make_message(
        "join_request", {"token": token, "csr_pem": csr, "node_id": "node-b", "address": "127.0.0.1:7802", "resources": RESOURCES}, network_id=NET, timestamp=NOW)))
    assert pki.verify_join_token(req.payload["token"], ca_cert).network_id == NET
    cert = pki.sign_node_certificate(ca_key, ca_cert, req.payload["csr_pem"], "node-" + "x" * 59, "worker")
    ok = decode(encode_message(make_message(
        "join_approved", {"certificate_pem": cert.decode(), "ca_pem": pki.pem(ca_cert).decode(), "config": CONFIG},
        network_id=NET, timestamp=NOW)))
    assert pki.node_identity(ok.payload["certificate_pem"].encode()).role == "worker"
