"""One authenticated WebSocket link: framing, the opening handshake, errors (the I/O side).

``worker.protocol`` says what may be sent and in which order; this module
does the sending over a ``websockets`` asyncio connection (websockets ≥ 13,
``websockets.asyncio``), like that library keeps its ``asyncio/connection.py``
apart from its sans-I/O ``worker/protocol/`` package.

Opening of a member (or control) link, after the TLS 1.3 handshake in which
both ends presented certificates of the same CA (``worker/pki.py``)::

    client → hello {node_id, role}           must match the client's certificate
    server → challenge {nonce_s}
    client → challenge {nonce_c}
    client → challenge_response {sig_c}      over nonce_s and the connection context
    server → challenge_response {sig_s}      over nonce_c and the connection context

The context (``pki.challenge_context``) binds both signatures to this
network, these two certificates and these two nonces, so a response recorded
on one connection fails on any other (a replay). A peer without a certificate
(possible only on a network port, ``allow_joiners``) gets a link with role
``joiner`` and no handshake; the daemon lets it ask to join and nothing else.

Before authentication (issue 13, finding 9; the numbers are in
``worker/protocol/limits.py``): servers are started with websockets' ``max_size``
at ``MAX_PREAUTH_FRAME_BYTES`` (64 KiB; a larger frame is refused from its header,
before its payload is read, with close code 1009); :func:`accept` runs the whole
opening under one deadline (``HANDSHAKE_DEADLINE_S``) and raises the frame limit
to ``MAX_FRAME_BYTES`` only once the peer's signature checked out
(:func:`set_frame_limit`). :class:`PreAuthGate` bounds how many connections may
be unauthenticated at once, per address and in total.

Receiving: :meth:`Link.recv` returns only valid, authorized messages; a frame
that fails (malformed, unknown type, wrong role, wrong order, wrong network)
is answered with an ``error`` reply and skipped. After
:data:`MAX_ERRORS_PER_LINK` such frames the link is closed (code 1008).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.exceptions import ConnectionClosed

from websockets.protocol import State

from worker import pki, protocol
from worker.protocol import JOINER, Handshake, Message, ProtocolError
from worker.protocol.limits import (
    HANDSHAKE_DEADLINE_S,
    MAX_FRAME_BYTES,
    MAX_PREAUTH_PER_ADDRESS,
    MAX_PREAUTH_TOTAL,
)

log = logging.getLogger(__name__)

#: Seconds the client side waits for each message of the opening (the server side has one
#: deadline for the whole opening, ``protocol.limits.HANDSHAKE_DEADLINE_S``).
HANDSHAKE_TIMEOUT_S = 15.0
#: Frames answered with an error before the link is closed (policy violation).
MAX_ERRORS_PER_LINK = 1000
#: seconds a tensor frame may lag the message it belongs to
TENSOR_WAIT_S = 30.0
#: WebSocket close code for a policy violation (RFC 6455 §7.4.1).
CLOSE_POLICY = 1008
#: The software version sent in ``hello``.
VERSION = "argus-worker/0.5"


class LinkClosed(Exception):
    """The peer closed the connection (or it broke); ``str()`` says so in words."""


class HandshakeFailed(Exception):
    """The opening failed: wrong or revoked certificate, bad signature, replay, timeout.

    ``str()`` is one sentence for a log or a user; ``code`` is the protocol error code.
    """

    def __init__(self, message: str, code: str = "not_authorized"):
        super().__init__(message)
        self.code = code


@dataclass
class Credentials:
    """What a node needs to speak on one network (or on a control endpoint).

    ``crl`` is read through ``crl_source`` when given (so a link accepted after a
    revocation sees the new list), else the fixed ``crl``.
    """

    network_id: str
    node_id: str
    role: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    crl: Optional[x509.CertificateRevocationList] = None
    crl_source: Any = None  # callable () -> CRL | None

    def current_crl(self) -> Optional[x509.CertificateRevocationList]:
        return self.crl_source() if self.crl_source is not None else self.crl

    @property
    def fingerprint(self) -> str:
        return pki.certificate_fingerprint(self.cert)


@dataclass
class Link:
    """An open connection with its peer's identity (None for a joiner) and role.

    ``network_id`` is the network every message on it must name.
    """

    ws: Any
    network_id: str
    role: str
    peer: Optional[pki.NodeIdentity]
    handshake: Handshake
    errors: int = 0
    closed_reason: Optional[str] = None
    extra: dict = field(default_factory=dict)
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def peer_node(self) -> Optional[str]:
        return self.peer.node_id if self.peer is not None else None

    def __post_init__(self) -> None:
        try:
            addr = self.ws.remote_address
        except Exception:  # a closed transport has no address any more
            addr = None
        self._remote = (f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}") if addr else "?"

    @property
    def remote_address(self) -> str:
        return self._remote

    async def send(self, m: Message, tensor: Optional[np.ndarray] = None, step: int = 0) -> None:
        """Send one message (text frame) and, for a ``tensor=True`` type, ``tensor`` as the
        binary frame right after it (both or neither reach the socket before another send).

        Raises LinkClosed if the connection is gone, ValueError if ``tensor`` is
        missing for a tensor message (or given for another type).
        """
        if m.spec.tensor != (tensor is not None):
            raise ValueError(f"{m.message_type} {'needs' if m.spec.tensor else 'takes no'} tensor frame")
        self.handshake.sent(m.message_type)
        text = protocol.encode_message(m)
        binary = None if tensor is None else protocol.encode_tensor(tensor, m.session_id, step, m.request_id)
        async def pair() -> None:
            async with self._send_lock:
                await self.ws.send(text)
                if binary is not None:
                    await self.ws.send(binary)

        try:  # shielded: a cancelled sender must not leave a message without its tensor on the wire
            await (pair() if binary is None else asyncio.shield(pair()))
        except ConnectionClosed as e:
            raise LinkClosed(_closed_text(self, e)) from None

    async def send_new(self, message_type: str, payload: Optional[dict] = None, *,
                       tensor: Optional[np.ndarray] = None, **kw: Any) -> Message:
        """Build, send and return a message on this link's network (``tensor``: see ``send``)."""
        m = protocol.make_message(message_type, payload, network_id=self.network_id, **kw)
        await self.send(m, tensor)
        return m

    async def reply(self, to: Message, message_type: str, payload: Optional[dict] = None, *,
                    tensor: Optional[np.ndarray] = None) -> None:
        await self.send(protocol.reply(to, message_type, payload), tensor)

    async def send_error(self, exc: BaseException, request_id: Optional[str] = None) -> None:
        """Answer with an ``error`` (ProtocolError code and message; anything else → internal)."""
        try:
            await self.send(protocol.error_reply(exc, request_id, network_id=self.network_id))
        except LinkClosed:
            pass

    async def close(self, code: int = 1000, reason: str = "") -> None:
        try:
            await self.ws.close(code, reason[:120])
        except Exception:  # already closed or broken: nothing left to do
            pass

    async def recv(self, timeout: Optional[float] = None) -> Message:
        """The next valid message this peer may send now.

        Invalid frames are answered with an error and skipped. Raises LinkClosed
        when the connection ends (or after too many bad frames), and
        asyncio.TimeoutError after ``timeout`` seconds without a valid message.
        """
        async def next_valid() -> Message:
            while True:
                try:
                    frame = await self.ws.recv()
                except ConnectionClosed as e:
                    raise LinkClosed(_closed_text(self, e)) from None
                try:
                    m = self._accept(frame)
                except ProtocolError as e:
                    await self._refuse(e)
                    continue
                if not m.spec.tensor:
                    return m
                try:  # its tensor frame comes next on the wire (send() keeps the pair together)
                    frame = await asyncio.wait_for(self.ws.recv(), TENSOR_WAIT_S)
                except ConnectionClosed as e:
                    raise LinkClosed(_closed_text(self, e)) from None
                except asyncio.TimeoutError:
                    await self._refuse(protocol.UnexpectedMessage(
                        f"the tensor frame of {m.message_type} did not follow it", request_id=m.request_id))
                    continue
                try:
                    if not isinstance(frame, (bytes, bytearray, memoryview)):
                        raise protocol.UnexpectedMessage(
                            f"{m.message_type} must be followed by its binary tensor frame", request_id=m.request_id)
                    tf = protocol.decode_tensor(frame)
                    protocol.check_tensor_for(m, tf)
                except ProtocolError as e:
                    e.request_id = e.request_id or m.request_id
                    await self._refuse(e)
                    continue
                return dataclasses.replace(m, tensor=tf)

        if timeout is None:
            return await next_valid()
        return await asyncio.wait_for(next_valid(), timeout)

    def _accept(self, frame: Any) -> Message:
        if isinstance(frame, (bytes, bytearray, memoryview)):
            tf = protocol.decode_tensor(frame)  # raises on a malformed one
            raise protocol.UnexpectedMessage("a tensor frame may only follow the message it belongs to",
                                             request_id=tf.request_id)
        m = protocol.decode_message(frame)
        if m.network_id != self.network_id:
            raise protocol.NotAuthorized(
                f"this connection belongs to network {self.network_id}; the message names {m.network_id}",
                request_id=m.request_id)
        try:
            protocol.authorize(m.message_type, self.role)
            self.handshake.received(m.message_type)
        except ProtocolError as e:
            e.request_id = m.request_id
            raise
        return m

    async def _refuse(self, e: ProtocolError) -> None:
        self.errors += 1
        log.debug("refused a frame from %s: %s", self.remote_address, e)
        await self.send_error(e)
        if self.errors >= MAX_ERRORS_PER_LINK:
            self.closed_reason = f"too many invalid frames ({self.errors})"
            await self.close(CLOSE_POLICY, "too many invalid frames")
            raise LinkClosed(f"{self.remote_address} sent {self.errors} invalid frames; connection closed")


# --------------------------------------------------------------------------- before authentication


def set_frame_limit(ws: Any, n_bytes: int) -> None:
    """Let the connection ``ws`` receive messages of up to ``n_bytes`` bytes from the next frame on.

    websockets (≥ 13) reads ``protocol.max_message_size`` afresh before each frame
    header (``websockets/protocol.py``, ``Protocol.parse``), and refuses a larger
    frame from its header alone (close 1009, nothing of the payload kept), so a
    server started with a small ``max_size`` can raise it for one connection once
    its peer is authenticated. Raises AttributeError if ``ws`` is not a websockets
    connection.
    """
    ws.protocol.max_message_size = n_bytes


def frame_limit(ws: Any) -> Optional[int]:
    """The largest message (bytes) the connection ``ws`` accepts now; None: no limit."""
    return ws.protocol.max_message_size


def source_address(ws: Any) -> str:
    """The peer's IP address (no port) of a connection, ``"?"`` when unknown."""
    try:
        addr = ws.remote_address
    except Exception:  # a transport already gone
        addr = None
    return str(addr[0]) if addr else "?"


def presented_certificate(ws: Any) -> bool:
    """True when the TLS peer of ``ws`` presented a certificate (which OpenSSL then verified
    against the network CA; see ``pki.server_context``)."""
    obj = getattr(ws, "transport", None) and ws.transport.get_extra_info("ssl_object")
    return bool(obj is not None and obj.getpeercert(binary_form=True))


class PreAuthGate:
    """Counts the connections that have not authenticated yet, and refuses more than the caps.

    A connection is counted from :meth:`admit` (websockets' ``process_request``: after
    TLS, before the HTTP upgrade is answered) until :meth:`release` (the opening
    succeeded, a joiner's token was accepted, or the connection ended) or until it is
    found closed. At most ``per_address`` counted connections may come from one IP
    address; at most ``total`` counted connections *without* a certificate (joiners)
    may be open at once, so a flood of joiners from many addresses cannot keep members
    (whose certificate TLS already checked) out. Single event loop; not thread-safe.
    """

    def __init__(self, per_address: int = MAX_PREAUTH_PER_ADDRESS, total: int = MAX_PREAUTH_TOTAL):
        if per_address < 1 or total < 1:
            raise ValueError(f"need per_address >= 1 and total >= 1, got {per_address}, {total}")
        self.per_address, self.total = per_address, total
        self._open: dict[Any, tuple[str, bool]] = {}  # connection -> (address, presented a certificate)

    def admit(self, ws: Any) -> Optional[str]:
        """Count ``ws``; return None when admitted, else why not (a sentence for the peer)."""
        self._prune()
        if ws in self._open:
            return None
        address, certified = source_address(ws), presented_certificate(ws)
        if sum(1 for a, _ in self._open.values() if a == address) >= self.per_address:
            return (f"too many connections from {address} are not authenticated yet "
                    f"(at most {self.per_address}); try again later")
        if not certified and sum(1 for _, c in self._open.values() if not c) >= self.total:
            return f"too many connections are not authenticated yet (at most {self.total}); try again later"
        self._open[ws] = (address, certified)
        return None

    def release(self, ws: Any) -> None:
        """Stop counting ``ws`` (idempotent)."""
        self._open.pop(ws, None)

    def count(self, address: Optional[str] = None) -> int:
        """Connections counted now (from ``address`` if given)."""
        self._prune()
        return sum(1 for a, _ in self._open.values() if address is None or a == address)

    def _prune(self) -> None:
        for ws in [w for w in self._open if getattr(w, "state", None) is State.CLOSED]:
            del self._open[ws]


def _closed_text(link: Link, e: ConnectionClosed) -> str:
    """Why the connection ended, in words: who closed it and the reason they gave."""
    who = link.peer_node or "the peer"
    if e.rcvd is not None:
        reason = f": {e.rcvd.reason}" if e.rcvd.reason else f" (code {e.rcvd.code})"
        return f"{who} at {link.remote_address} closed the connection{reason}"
    return f"the connection to {who} at {link.remote_address} broke"


def _ssl_object(ws: Any) -> ssl.SSLObject:
    obj = ws.transport.get_extra_info("ssl_object")
    if obj is None:
        raise HandshakeFailed("the connection is not TLS")
    return obj


def _context(network_id: str, client_fp: str, server_fp: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return pki.challenge_context(network_id, client_fp, server_fp, client_nonce, server_nonce)


async def accept(ws: Any, creds: Credentials, nonces: pki.NonceCache, *, resources: Optional[dict] = None) -> Link:
    """Server side: the identity checks and the opening on an accepted connection.

    Returns a Link whose ``role`` is the peer certificate's role (``joiner`` when
    the peer presented none; no opening is run then, and the connection keeps the
    pre-authentication frame limit). The opening must finish within
    ``HANDSHAKE_DEADLINE_S`` seconds; on success the frame limit becomes
    ``MAX_FRAME_BYTES``. Raises HandshakeFailed after telling the peer why (an
    ``error`` reply) and closing with 1008.
    """
    ssl_obj = _ssl_object(ws)
    link = Link(ws, creds.network_id, JOINER, None, Handshake(initiator=False))
    if not ssl_obj.getpeercert(binary_form=True):
        return link
    try:
        identity = pki.peer_identity(ssl_obj, ca_cert=creds.ca_cert, crl=creds.current_crl())
        peer_cert = x509.load_der_x509_certificate(ssl_obj.getpeercert(binary_form=True))
    except pki.PKIError as e:
        await _fail(link, str(e))
    link.peer, link.role = identity, identity.role
    try:
        async with asyncio.timeout(HANDSHAKE_DEADLINE_S):
            hello = await link.recv()
            if hello.message_type != "hello":  # the Handshake allows error messages; nothing else
                await _fail(link, f"expected hello, got {hello.message_type}")
            if hello.payload["node_id"] != identity.node_id or hello.payload["role"] != identity.role:
                await _fail(link, f"hello names {hello.payload['node_id']}/{hello.payload['role']} but the "
                                  f"certificate names {identity.node_id}/{identity.role}")
            link.extra["hello"] = hello.payload
            server_nonce = pki.make_challenge()
            await link.send_new("challenge", {"nonce": protocol.b64(server_nonce)})
            ch = await link.recv()
            client_nonce = protocol.unb64(ch.payload["nonce"])
            resp = await link.recv()
            ctx = _context(creds.network_id, identity.fingerprint, creds.fingerprint, client_nonce, server_nonce)
            try:
                pki.verify_challenge(peer_cert, server_nonce, ctx, protocol.unb64(resp.payload["signature"]), nonces)
            except pki.ChallengeFailed as e:
                await _fail(link, str(e))
            # Authenticated: the peer waits for our answer before it sends anything else, so the
            # larger limit applies from its first frame after the opening on.
            set_frame_limit(ws, MAX_FRAME_BYTES)
            sig = pki.sign_challenge(creds.key, client_nonce, ctx)
            await link.send_new("challenge_response", {"signature": protocol.b64(sig)})
    except TimeoutError:
        await _fail(link, f"the opening handshake took longer than {HANDSHAKE_DEADLINE_S:g} s",
                    code="unexpected_message")
    except LinkClosed as e:
        raise HandshakeFailed(str(e), code="unexpected_message") from None
    return link


async def open_link(
    ws: Any,
    creds: Credentials,
    nonces: pki.NonceCache,
    *,
    expected_node_id: Optional[str] = None,
    expected_role: Optional[str] = None,
    resources: Optional[dict] = None,
) -> Link:
    """Client side: check the server's certificate, then run the opening as initiator.

    Raises HandshakeFailed (server not of this CA, revoked, unexpected node or
    role, bad challenge signature, timeout) after closing the connection.
    """
    ssl_obj = _ssl_object(ws)
    link = Link(ws, creds.network_id, "admin", None, Handshake(initiator=True))
    try:
        identity = pki.peer_identity(ssl_obj, ca_cert=creds.ca_cert, crl=creds.current_crl(),
                                     expected_node_id=expected_node_id, expected_role=expected_role)
        server_cert = x509.load_der_x509_certificate(ssl_obj.getpeercert(binary_form=True))
    except pki.PKIError as e:
        await link.close(CLOSE_POLICY, "server certificate refused")
        raise HandshakeFailed(f"the server's certificate was refused: {e}") from None
    link.peer, link.role = identity, identity.role
    try:
        await link.send_new("hello", {"node_id": creds.node_id, "role": creds.role, "version": VERSION,
                                      "resources": resources or {}})
        ch = await _expect(link, "challenge")
        server_nonce = protocol.unb64(ch.payload["nonce"])
        client_nonce = pki.make_challenge()
        await link.send_new("challenge", {"nonce": protocol.b64(client_nonce)})
        ctx = _context(creds.network_id, creds.fingerprint, identity.fingerprint, client_nonce, server_nonce)
        await link.send_new("challenge_response", {"signature": protocol.b64(pki.sign_challenge(creds.key, server_nonce, ctx))})
        resp = await _expect(link, "challenge_response")
        try:
            pki.verify_challenge(server_cert, client_nonce, ctx, protocol.unb64(resp.payload["signature"]), nonces)
        except pki.ChallengeFailed as e:
            await link.close(CLOSE_POLICY, "challenge failed")
            raise HandshakeFailed(f"the server failed the challenge: {e}") from None
    except asyncio.TimeoutError:
        await link.close(CLOSE_POLICY, "handshake timeout")
        raise HandshakeFailed("the server did not finish the opening handshake in time", code="unexpected_message") from None
    except LinkClosed as e:
        raise HandshakeFailed(str(e), code="unexpected_message") from None
    return link


async def _expect(link: Link, message_type: str) -> Message:
    """The next message, which must be ``message_type``; an ``error`` becomes HandshakeFailed."""
    m = await link.recv(HANDSHAKE_TIMEOUT_S)
    if m.message_type == "error":
        await link.close()
        raise HandshakeFailed(f"refused: {m.payload['message']}", code=m.payload["code"])
    if m.message_type != message_type:
        await link.close(CLOSE_POLICY, "unexpected message")
        raise HandshakeFailed(f"expected {message_type}, got {m.message_type}", code="unexpected_message")
    return m


async def _fail(link: Link, why: str, code: str = "not_authorized") -> None:
    """Tell the peer (an error reply), close with 1008, raise HandshakeFailed."""
    exc = protocol.NotAuthorized(why) if code == "not_authorized" else protocol.UnexpectedMessage(why)
    await link.send_error(exc)
    await link.close(CLOSE_POLICY, why)
    raise HandshakeFailed(why, code=code)


__all__ = [
    "CLOSE_POLICY", "Credentials", "HANDSHAKE_TIMEOUT_S", "HandshakeFailed", "Link", "LinkClosed",
    "MAX_ERRORS_PER_LINK", "PreAuthGate", "VERSION", "accept", "frame_limit", "open_link", "presented_certificate",
    "set_frame_limit", "source_address",
]
