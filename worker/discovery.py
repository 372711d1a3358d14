"""LAN discovery: "which Argus networks are out there?" as one UDP query and its answers.

Wire format (one JSON object per UDP datagram, UTF-8, at most ``MAX_DATAGRAM_BYTES``)::

    query   {"argus": "discover", "v": 1, "nonce": "<16 lowercase hex>"}
    answer  {"argus": "networks", "v": 1, "nonce": "<the query's>", "node_id": "<id>",
             "networks": [{"network_id", "name", "model_id", "admin_address": "host:port",
                           "ca_fingerprint": "<64 hex>"}, ...],
             "truncated": false}

An answer holds public facts only: ids, names, the admin's address and the network CA's
SHA-256 fingerprint (public; a joiner compares it with the one in its join token). The
responder copies just those fields from whatever its ``answer`` callback returns, so a
secret handed to it by mistake still never leaves the machine.

Not an amplifier (RFC 9000 §8.1 sets the same 3x budget for QUIC servers):
* an answer goes only to the query's source address, is at most
  ``AMPLIFICATION_FACTOR`` times the query's size and at most ``MAX_DATAGRAM_BYTES``
  (networks that do not fit are left out and ``truncated`` is true);
  ``discover_networks`` pads its query with trailing spaces (valid JSON whitespace)
  to ``QUERY_PAD_BYTES`` so that a full answer fits;
* answers are rate-limited per source IP (not per port: with a forged source the
  victim is a host), ``RATE_PER_S`` per second with bursts of ``RATE_BURST``.

Malformed, oversize, unknown or foreign datagrams are dropped, counted in
``DiscoveryResponder.stats`` and logged at debug level; nothing a datagram holds can
raise out of the responder. The codec (``encode_query`` ... ``decode_answer``) is
pure; ``DiscoveryResponder`` and ``discover_networks`` do the I/O (asyncio datagrams).

Targets are IP literals (``parse_targets``), so sending never blocks on DNS. The
default target is the IPv4 limited broadcast address, i.e. the local LAN: tests must
pass loopback targets (or ones inside a network namespace they created).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self

log = logging.getLogger(__name__)

DEFAULT_DISCOVERY_PORT = 47474
PROTOCOL_TAG_QUERY = "discover"
PROTOCOL_TAG_ANSWER = "networks"
VERSION = 1
MAX_DATAGRAM_BYTES = 1200  # fits any path MTU >= 1280 (IPv6 minimum) with IP/UDP headers
AMPLIFICATION_FACTOR = 3  # answer bytes <= 3 x query bytes (RFC 9000 §8.1)
QUERY_PAD_BYTES = MAX_DATAGRAM_BYTES // AMPLIFICATION_FACTOR  # 400: room for a full answer
RATE_PER_S = 10.0  # answers per second per source IP, sustained
RATE_BURST = 10  # answers per source IP in a burst
MAX_SOURCES = 1024  # source IPs the rate limiter tracks at once; beyond that, new ones wait

NETWORK_FIELDS = ("network_id", "name", "model_id", "admin_address", "ca_fingerprint")
_REQUIRED_NETWORK_FIELDS = ("network_id", "name", "model_id", "admin_address")
_FIELD_MAX = {"network_id": 64, "name": 64, "model_id": 128, "admin_address": 262, "ca_fingerprint": 64}
_NONCE_RE = re.compile(r"[0-9a-f]{16}")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # worker/pki.py's id rule
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")

AnswerFn = Callable[[], tuple[str, list[dict]]]
Address = tuple[str, int]


class DiscoveryError(Exception):
    """Base of discovery errors."""


class MalformedDatagram(DiscoveryError):
    """A datagram is not a well-formed discovery query or answer (the reason is the message)."""


# --- codec (pure) --------------------------------------------------------------------


def new_nonce() -> str:
    """16 lowercase hex characters (64 random bits) naming one discovery round."""
    return secrets.token_hex(8)


def encode_query(nonce: str, pad_to: int = QUERY_PAD_BYTES) -> bytes:
    """The query datagram for ``nonce``, padded with trailing spaces to ``pad_to`` bytes.

    Raises ValueError for a malformed nonce or pad_to > MAX_DATAGRAM_BYTES.
    """
    if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
        raise ValueError(f"nonce must be 16 lowercase hex characters, got {nonce!r}")
    if pad_to > MAX_DATAGRAM_BYTES:
        raise ValueError(f"pad_to must be <= {MAX_DATAGRAM_BYTES}, got {pad_to}")
    data = _dumps({"argus": PROTOCOL_TAG_QUERY, "v": VERSION, "nonce": nonce})
    return data + b" " * max(0, pad_to - len(data))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _loads_object(data: bytes, tag: str) -> dict:
    """The JSON object in ``data`` with ``argus`` == ``tag`` and ``v`` == 1, else MalformedDatagram."""
    if len(data) > MAX_DATAGRAM_BYTES:
        raise MalformedDatagram(f"{len(data)} bytes is over the {MAX_DATAGRAM_BYTES}-byte limit")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MalformedDatagram(f"not UTF-8 JSON: {type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise MalformedDatagram(f"a JSON {type(obj).__name__}, not an object")
    if obj.get("argus") != tag:
        raise MalformedDatagram(f"argus is not {tag!r}")
    if type(obj.get("v")) is not int or obj["v"] != VERSION:
        raise MalformedDatagram(f"unsupported version {obj.get('v')!r:.20}")
    return obj


def decode_query(data: bytes) -> str:
    """The nonce of a query datagram. Unknown extra keys are ignored (later versions
    may add some). Raises MalformedDatagram."""
    obj = _loads_object(data, PROTOCOL_TAG_QUERY)
    nonce = obj.get("nonce")
    if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
        raise MalformedDatagram("nonce is not 16 lowercase hex characters")
    return nonce


def public_network(entry: Mapping[str, Any]) -> dict[str, str] | None:
    """Only the public fields of one network entry (``NETWORK_FIELDS``), checked; None
    when a required field is missing or a field is malformed (wrong type, too long, an
    id or fingerprint of the wrong shape)."""
    if not isinstance(entry, Mapping):
        return None
    out: dict[str, str] = {}
    for name in NETWORK_FIELDS:
        value = entry.get(name)
        if value is None and name not in _REQUIRED_NETWORK_FIELDS:
            continue
        if not isinstance(value, str) or not 1 <= len(value) <= _FIELD_MAX[name]:
            return None
        out[name] = value
    if not _ID_RE.fullmatch(out["network_id"]):
        return None
    if "ca_fingerprint" in out and not _FINGERPRINT_RE.fullmatch(out["ca_fingerprint"]):
        return None
    return out


def encode_answer(nonce: str, node_id: str, networks: Sequence[Mapping[str, Any]], max_bytes: int = MAX_DATAGRAM_BYTES) -> bytes | None:
    """The answer datagram, at most ``min(max_bytes, MAX_DATAGRAM_BYTES)`` bytes.

    Each network is reduced to ``public_network`` (malformed ones are left out); networks
    are added in order while they fit, ``truncated`` says whether any was left out for
    size. Returns None when not even the answer with no networks fits.
    Raises ValueError for a malformed nonce or node id.
    """
    if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
        raise ValueError(f"nonce must be 16 lowercase hex characters, got {nonce!r}")
    if not isinstance(node_id, str) or not _ID_RE.fullmatch(node_id):
        raise ValueError(f"node id {node_id!r} is malformed")
    limit = min(max_bytes, MAX_DATAGRAM_BYTES)
    entries = [p for p in map(public_network, networks) if p is not None]
    base = {"argus": PROTOCOL_TAG_ANSWER, "v": VERSION, "nonce": nonce, "node_id": node_id}

    def build(kept: list[dict]) -> bytes:
        return _dumps({**base, "networks": kept, "truncated": len(kept) < len(entries)})

    kept: list[dict] = []
    data = build(kept)
    if len(data) > limit:
        return None
    for entry in entries:
        candidate = build([*kept, entry])
        if len(candidate) > limit:
            break
        kept.append(entry)
        data = candidate
    return data


def decode_answer(data: bytes, nonce: str) -> tuple[str, list[dict[str, str]]]:
    """``(node_id, networks)`` of an answer to our ``nonce``; malformed network entries
    are dropped. Raises MalformedDatagram (including an answer to another nonce)."""
    obj = _loads_object(data, PROTOCOL_TAG_ANSWER)
    if obj.get("nonce") != nonce:
        raise MalformedDatagram("nonce does not match our query")
    node_id, networks = obj.get("node_id"), obj.get("networks")
    if not isinstance(node_id, str) or not _ID_RE.fullmatch(node_id):
        raise MalformedDatagram("node_id is missing or malformed")
    if not isinstance(networks, list):
        raise MalformedDatagram("networks is not a list")
    return node_id, [p for p in map(public_network, networks) if p is not None]


# --- rate limit (pure) ---------------------------------------------------------------


class RateLimiter:
    """Token buckets per key: ``rate`` per second sustained, ``burst`` at once.

    At most ``max_keys`` buckets are kept; full (idle) buckets are forgotten first, and
    a new key that finds no room is refused until some bucket refills. ``now`` is
    seconds on a monotonic clock (default ``time.monotonic()``).
    """

    def __init__(self, rate: float = RATE_PER_S, burst: int = RATE_BURST, max_keys: int = MAX_SOURCES):
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError(f"need rate > 0, burst >= 1, max_keys >= 1, got {rate}, {burst}, {max_keys}")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict[Any, tuple[float, float]] = {}  # key -> (tokens, time of last update)

    def allow(self, key: Any, now: float | None = None) -> bool:
        """Take one token from ``key``'s bucket; False when it is empty."""
        now = time.monotonic() if now is None else now
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._forget_full(now)
            if len(self._buckets) >= self.max_keys:
                return False
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def _forget_full(self, now: float) -> None:
        refill = self.burst / self.rate
        for key in [k for k, (_, last) in self._buckets.items() if now - last >= refill]:
            del self._buckets[key]


# --- responder (I/O) -----------------------------------------------------------------


class _ResponderProtocol(asyncio.DatagramProtocol):
    def __init__(self, responder: DiscoveryResponder):
        self.responder = responder

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.responder._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self.responder._handle(data, addr)
        except Exception:  # a bug here must not stop the endpoint
            self.responder.stats["internal_error"] += 1
            log.exception("discovery: failed to handle a datagram from %s", _fmt(addr))

    def error_received(self, exc: Exception) -> None:
        self.responder.stats["socket_error"] += 1
        log.debug("discovery responder: socket error %s", exc)


class DiscoveryResponder:
    """Answers discovery queries on a UDP port. Build with ``await DiscoveryResponder.start(...)``.

    ``answer()`` is called on the event loop for each accepted query and returns
    ``(node_id, networks)``; it must be quick (in-memory state) and may return full
    network records: only ``NETWORK_FIELDS`` are sent. If it raises, the query goes
    unanswered (counted as ``answer_failed``, logged).

    ``stats`` counts ``received``, ``answered``, ``malformed``, ``rate_limited``,
    ``answer_failed``, ``answer_too_large``, ``socket_error``, ``internal_error``.
    """

    def __init__(self, answer: AnswerFn, limiter: RateLimiter):
        self._answer = answer
        self._limiter = limiter
        self._transport: asyncio.DatagramTransport | None = None
        self.stats: Counter[str] = Counter()
        self.host = ""
        self.port = 0

    @classmethod
    async def start(
        cls, host: str, port: int, answer: AnswerFn, *, rate_per_s: float = RATE_PER_S, burst: int = RATE_BURST,
    ) -> DiscoveryResponder:
        """Listen on ``host``:``port`` (UDP; port 0 picks a free one, see ``.port``).

        ``host`` "0.0.0.0" receives LAN broadcasts; "127.0.0.1" only this machine.
        Raises OSError (port in use, address not local).
        """
        self = cls(answer, RateLimiter(rate_per_s, burst))
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: _ResponderProtocol(self), local_addr=(host, port))
        assert self._transport is not None
        self.host, self.port = self._transport.get_extra_info("sockname")[:2]
        return self

    def _handle(self, data: bytes, addr: Any) -> None:
        self.stats["received"] += 1
        try:
            nonce = decode_query(data)
        except MalformedDatagram as e:
            self.stats["malformed"] += 1
            log.debug("discovery: dropped %d bytes from %s: %s", len(data), _fmt(addr), e)
            return
        if not self._limiter.allow(addr[0]):
            self.stats["rate_limited"] += 1
            log.debug("discovery: rate limit for %s", addr[0])
            return
        try:
            node_id, networks = self._answer()
            reply = encode_answer(nonce, node_id, networks, max_bytes=AMPLIFICATION_FACTOR * len(data))
        except Exception:  # the daemon's callback failed; the query goes unanswered
            self.stats["answer_failed"] += 1
            log.exception("discovery: building the answer failed")
            return
        if reply is None:
            self.stats["answer_too_large"] += 1
            log.debug("discovery: a %d-byte query from %s is too small for an answer", len(data), _fmt(addr))
            return
        if self._transport is not None:
            self._transport.sendto(reply, addr)
            self.stats["answered"] += 1

    def close(self) -> None:
        """Stop listening (idempotent)."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


# --- discovering (I/O) ---------------------------------------------------------------


def _fmt(addr: Any) -> str:
    """``host:port``, or ``[v6 host]:port``."""
    try:
        host, port = addr[0], addr[1]
    except (TypeError, IndexError):
        return repr(addr)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def parse_targets(text: str) -> list[Address]:
    """Targets from ``"127.0.0.1:47474,10.0.0.255:47474,[::1]:47474"``.

    Comma- or space-separated ``ip:port`` with IP literals (IPv6 in brackets); a bare
    IP gets ``DEFAULT_DISCOVERY_PORT``. Raises ValueError naming the bad entry.
    """
    targets: list[Address] = []
    for part in (p for p in re.split(r"[\s,]+", text.strip()) if p):
        m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", part)
        if m is None:
            raise ValueError(f"discovery target {part!r} must be ip:port (IPv6 as [addr]:port)")
        host = m.group(1) or m.group(3)
        port_text = m.group(2) or m.group(4)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"discovery target {part!r}: {host!r} is not an IP address") from None
        port = int(port_text) if port_text else DEFAULT_DISCOVERY_PORT
        if not 1 <= port <= 65535:
            raise ValueError(f"discovery target {part!r}: port must be 1-65535")
        targets.append((str(ip), port))
    if not targets:
        raise ValueError("no discovery targets given; write ip:port[,ip:port...]")
    return targets


class _Collector(asyncio.DatagramProtocol):
    def __init__(self, nonce: str, found: list[dict], seen: set[tuple[str, str]]):
        self.nonce, self.found, self.seen = nonce, found, seen
        self.ignored = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            node_id, networks = decode_answer(data, self.nonce)
        except MalformedDatagram as e:
            self.ignored += 1
            log.debug("discover: ignored %d bytes from %s: %s", len(data), _fmt(addr), e)
            return
        for net in networks:
            key = (net["network_id"], net["admin_address"])
            if key not in self.seen:
                self.seen.add(key)
                self.found.append({**net, "node_id": node_id, "source": _fmt(addr)})

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable on loopback
        log.debug("discover: socket error %s", exc)


async def discover_networks(
    targets: Sequence[Address] = (("255.255.255.255", DEFAULT_DISCOVERY_PORT),), timeout_s: float = 1.0,
) -> list[dict]:
    """Networks answering a query sent to each of ``targets`` within ``timeout_s`` seconds.

    One socket per address family, bound to an ephemeral port; IPv4 sockets get
    SO_BROADCAST (it only permits sending to a broadcast address such as the default
    255.255.255.255 or a subnet's x.y.z.255; it sends nothing by itself). Only answers
    echoing this round's fresh nonce count. Results, in arrival order, deduplicated by
    (network_id, admin_address): the ``NETWORK_FIELDS`` present plus ``node_id`` (who
    answered) and ``source`` (its "ip:port").

    Raises ValueError for a target that is not (IP literal, port).
    """
    families: dict[int, list[Address]] = {}
    for host, port in targets:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"discovery target {host!r} is not an IP address") from None
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"discovery target port {port!r} must be 1-65535")
        families.setdefault(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, []).append((str(ip), port))
    nonce = new_nonce()
    query = encode_query(nonce)
    found: list[dict] = []
    seen: set[tuple[str, str]] = set()
    loop = asyncio.get_running_loop()
    transports: list[asyncio.DatagramTransport] = []
    try:
        for family, addrs in families.items():
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                if family == socket.AF_INET:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                sock.bind(("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            transport, _ = await loop.create_datagram_endpoint(lambda: _Collector(nonce, found, seen), sock=sock)
            transports.append(transport)
            for addr in addrs:
                transport.sendto(query, addr)
        await asyncio.sleep(timeout_s)
    finally:
        for transport in transports:
            transport.close()
    return found


__all__ = [
    "DEFAULT_DISCOVERY_PORT", "DiscoveryError", "DiscoveryResponder", "MalformedDatagram", "RateLimiter",
    "decode_answer", "decode_query", "discover_networks", "encode_answer", "encode_query", "parse_targets",
    "public_network",
]
