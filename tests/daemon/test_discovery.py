"""LAN discovery over UDP: real responders and queries on loopback only.

NETWORK RULE: these tests send datagrams to 127.0.0.0/8 or ::1 only. The broadcast test
at the end sends to 255.255.255.255 only inside two network namespaces it creates and
links with a veth pair (root and iproute2 needed; skipped otherwise), so no datagram
reaches a real LAN.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import pki
from worker.discovery import (
    AMPLIFICATION_FACTOR,
    DEFAULT_DISCOVERY_PORT,
    MAX_DATAGRAM_BYTES,
    NETWORK_FIELDS,
    DiscoveryResponder,
    MalformedDatagram,
    RateLimiter,
    decode_answer,
    decode_query,
    discover_networks,
    encode_answer,
    encode_query,
    parse_targets,
)

from tests.support.paths import REPO
FP = "ab" * 32
NONCE = "0123456789abcdef"
WAIT = 0.3  # seconds discover_networks listens on loopback


def network(i: int = 1, admin: str = "127.0.0.1:7701", **extra) -> dict:
    return {"network_id": f"net-{i}", "name": f"Lab {i}", "model_id": "smollm2-135m",
            "admin_address": admin, "ca_fingerprint": FP, **extra}


def answering(node_id: str, *networks: dict):
    return lambda: (node_id, list(networks))


class RawPeer(asyncio.DatagramProtocol):
    """A plain UDP socket on loopback for sending hand-made datagrams and keeping replies."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.received.append((data, addr))

    def error_received(self, exc: Exception) -> None:
        pass

    @classmethod
    async def open(cls, host: str = "127.0.0.1") -> RawPeer:
        loop = asyncio.get_running_loop()
        _, peer = await loop.create_datagram_endpoint(cls, local_addr=(host, 0))
        return peer

    def send(self, data: bytes, port: int, host: str = "127.0.0.1") -> None:
        self.transport.sendto(data, (host, port))

    def close(self) -> None:
        self.transport.close()


# --- finding networks on loopback -----------------------------------------------------


async def test_a_responder_answers_a_query_sent_to_its_loopback_port():
    async with await DiscoveryResponder.start("127.0.0.1", 0, answering("node-a", network(1))) as r:
        assert r.port != 0

        found = await discover_networks([("127.0.0.1", r.port)], timeout_s=WAIT)

    assert found == [{**network(1), "node_id": "node-a", "source": f"127.0.0.1:{r.port}"}]


async def test_two_responders_on_two_ports_are_both_found():
    async with await DiscoveryResponder.start("127.0.0.1", 0, answering("node-a", network(1))) as a, \
               await DiscoveryResponder.start("127.0.0.1", 0, answering("node-b", network(2, "127.0.0.1:7702"))) as b:
        found = await discover_networks([("127.0.0.1", a.port), ("127.0.0.1", b.port)], timeout_s=WAIT)

    assert sorted((f["network_id"], f["node_id"], f["source"]) for f in found) == [
        ("net-1", "node-a", f"127.0.0.1:{a.port}"), ("net-2", "node-b", f"127.0.0.1:{b.port}"),
    ]


async def test_a_network_announced_by_two_members_is_listed_once():
    same = network(1)
    async with await DiscoveryResponder.start("127.0.0.1", 0, answering("node-a", same)) as a, \
               await DiscoveryResponder.start("127.0.0.1", 0, answering("node-b", same)) as b:
        found = await discover_networks([("127.0.0.1", a.port), ("127.0.0.1", b.port)], timeout_s=WAIT)

    assert [f["network_id"] for f in found] == ["net-1"]


async def test_a_responder_on_ipv6_loopback_is_found():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        r = await DiscoveryResponder.start("::1", 0, answering("node-a", network(1)))
    except OSError as e:
        pytest.skip(f"IPv6 loopback unavailable: {e}")
    try:
        found = await discover_networks([("::1", r.port)], timeout_s=WAIT)
    finally:
        r.close()

    assert [(f["network_id"], f["source"]) for f in found] == [("net-1", f"[::1]:{r.port}")]


async def test_nobody_listening_means_no_networks_after_the_timeout():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()

    found = await discover_networks([("127.0.0.1", port)], timeout_s=WAIT)

    assert found == []
    assert time.monotonic() - started >= WAIT * 0.9


class WrongNonceResponder(RawPeer):
    """Answers every query with another nonce, a malformed nonce, and junk."""

    def datagram_received(self, data: bytes, addr) -> None:
        self.transport.sendto(encode_answer("f" * 16, "node-x", [network(9)]), addr)
        self.transport.sendto(b'{"argus": "networks", "v": 1, "nonce": 5}', addr)
        self.transport.sendto(b"\xff" * 50, addr)


async def test_answers_to_another_nonce_or_garbage_are_ignored():
    peer = await WrongNonceResponder.open()
    port = peer.transport.get_extra_info("sockname")[1]
    try:
        found = await discover_networks([("127.0.0.1", port)], timeout_s=WAIT)
    finally:
        peer.close()

    assert found == []


# --- robustness -------------------------------------------------------------------------


def malformed_datagrams(n: int, seed: int = 4747) -> list[bytes]:
    """Random bytes, mutated queries, wrong types, oversize and deeply nested JSON."""
    rng = random.Random(seed)
    query = encode_query(NONCE)
    fixed = [
        b"", b"{}", b"[]", b"null", b"\x00", b"[" * 600 + b"]" * 600, b'{"a":' * 300 + b"1" + b"}" * 300,
        b'{"argus":"discover","v":1}', b'{"argus":"discover","v":2,"nonce":"0123456789abcdef"}',
        b'{"argus":"discover","v":true,"nonce":"0123456789abcdef"}', b'{"argus":"discover","v":1,"nonce":"XYZ"}',
        b'{"argus":"discover","v":1,"nonce":1e400}', b'{"argus":"networks","v":1,"nonce":"0123456789abcdef"}',
        b'{"argus":"discover","v":1,"nonce":"0123456789abcdef"', query + b"x", b"\xef\xbb\xbf" + query,
        b" " * 1300, query + b" " * 900, "{\"argus\":\"discover\",\"v\":1,\"nonce\":\"\ud800\"}".encode("utf-8", "surrogatepass"),
    ]
    out = list(fixed)
    while len(out) < n:
        kind = rng.randrange(3)
        if kind == 0:
            out.append(rng.randbytes(rng.randrange(1, 1500)))
        elif kind == 1:  # flip bytes in a valid query, keeping it invalid
            b = bytearray(query[:60])
            for _ in range(rng.randrange(1, 6)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            try:
                decode_query(bytes(b))
            except MalformedDatagram:
                out.append(bytes(b))
        else:
            value = rng.choice([None, True, 3, -1.5, "x" * rng.randrange(2000), [1, 2], {"nonce": NONCE}])
            out.append(json.dumps({"argus": rng.choice(["discover", "networks", 1, None]), "v": 1,
                                   "nonce": value}).encode())
    return out[:n]


async def test_a_thousand_malformed_datagrams_do_not_stop_the_responder():
    async with await DiscoveryResponder.start("127.0.0.1", 0, answering("node-a", network(1))) as r:
        peer = await RawPeer.open()
        for i, data in enumerate(malformed_datagrams(1000)):
            peer.send(data, r.port)
            if i % 25 == 0:
                await asyncio.sleep(0.001)  # let the responder read; a full socket buffer would drop them
        await asyncio.sleep(0.2)
        peer.close()

        found = await discover_networks([("127.0.0.1", r.port)], timeout_s=WAIT)

    assert [f["network_id"] for f in found] == ["net-1"]
    assert r.stats["malformed"] >= 900  # loopback may drop a few under load; none was answered
    assert r.stats["answered"] == 1
    assert r.stats["internal_error"] == 0


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=MAX_DATAGRAM_BYTES + 10))
def test_decode_query_of_any_bytes_returns_a_nonce_or_raises_malformed(data):
    try:
        nonce = decode_query(data)
    except MalformedDatagram:
        return
    assert len(nonce) == 16


@settings(max_examples=500, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=30))
def test_decode_answer_of_any_json_returns_checked_networks_or_raises_malformed(value):
    obj = {"argus": "networks", "v": 1, "nonce": NONCE, "node_id": "node-a", "networks": value}
    try:
        _, networks = decode_answer(json.dumps(obj).encode()[:MAX_DATAGRAM_BYTES], NONCE)
    except MalformedDatagram:
        return
    assert all(set(n) <= set(NETWORK_FIELDS) and all(isinstance(v, str) for v in n.values()) for n in networks)


async def test_an_oversize_query_is_dropped():
    async with await DiscoveryResponder.start("127.0.0.1", 0, answering("node-a", network(1))) as r:
        peer = await RawPeer.open()
        peer.send(encode_query(NONCE) + b" " * (MAX_DATAGRAM_BYTES + 1 - len(encode_query(NONCE))), r.port)
        await asyncio.sleep(0.2)
        peer.close()

    assert peer.received == []
    assert r.stats["malformed"] == 1


async def test_a_failing_answer_callback_leaves_the_query_unanswered_and_the_responder_running():
    calls = []

    def answer():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("config not loaded yet")
        return "node-a", [network(1)]

    async with await DiscoveryResponder.start("127.0.0.1", 0, answer) as r:
        first = await discover_networks([("127.0.0.1", r.port)], timeout_s=WAIT)
        second = await discover_networks([("127.0.0.1", r.port)], timeout_s=WAIT)

    assert first == [] and [f["network_id"] for f in second] == ["net-1"]
    assert r.stats["answer_failed"] == 1


# --- not an amplifier, not a leak -------------------------------------------------------------


async def test_answers_are_rate_limited_per_source_address():
    async with await DiscoveryResponder.start("127.0.0.1", 0, answering("node-a", network(1))) as r:
        flooder, other = await RawPeer.open("127.0.0.1"), await RawPeer.open("127.0.0.2")
        started = time.monotonic()
        for i in range(50):
            flooder.send(encode_query(f"{i:016x}"), r.port)
        await asyncio.sleep(0.01)
        other.send(encode_query(NONCE), r.port)
        await asyncio.sleep(0.2)
        flooder.close()
        other.close()
        window = time.monotonic() - started

    assert 10 <= len(flooder.received) <= 10 + int(window * 10) + 1  # burst 10, then 10/s
    assert r.stats["rate_limited"] == 50 - len(flooder.received)
    assert len(other.received) == 1  # another host is not held back by the flood


async def test_answers_go_only_to_the_querier():
    async with await DiscoveryResponder.start("127.0.0.1", 0, answering("node-a", network(1))) as r:
        asker, bystander = await RawPeer.open(), await RawPeer.open()
        asker.send(encode_query(NONCE), r.port)
        await asyncio.sleep(0.2)
        asker.close()
        bystander.close()

    assert len(asker.received) == 1 and asker.received[0][1][1] == r.port
    assert bystander.received == []


async def test_an_answer_is_at_most_three_times_its_query_and_one_datagram():
    many = [network(i, f"192.168.1.{i}:7701") for i in range(50)]
    async with await DiscoveryResponder.start("127.0.0.1", 0, answering("node-" + "a" * 40, *many)) as r:
        peer = await RawPeer.open()
        small = encode_query(NONCE, pad_to=0)  # an unpadded 52-byte query from some other client
        padded = encode_query("1" * 16)
        peer.send(small, r.port)
        peer.send(padded, r.port)
        await asyncio.sleep(0.2)
        peer.close()

    assert len(peer.received) <= 2
    for data, _ in peer.received:
        obj = json.loads(data)
        query = small if obj["nonce"] == NONCE else padded
        assert len(data) <= AMPLIFICATION_FACTOR * len(query)
        assert len(data) <= MAX_DATAGRAM_BYTES
        assert obj["truncated"] is True
    full = [json.loads(d) for d, _ in peer.received if json.loads(d)["nonce"] == "1" * 16]
    assert len(full) == 1 and 1 <= len(full[0]["networks"]) < 50


async def test_answers_hold_only_public_fields_never_secrets():
    ca_key, ca_cert = pki.create_network_ca("net-1", "Home lab")
    fingerprint = pki.ca_fingerprint(ca_cert)
    token = pki.issue_join_token(ca_key, "net-1", "127.0.0.1:7701", fingerprint)
    key_pem = ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    full_record = {**network(1), "ca_fingerprint": fingerprint, "ca_key": key_pem, "join_token": token,
                   "tokens": [token], "members": [{"node_id": "node-b", "key": key_pem}], "port": 7701}

    async with await DiscoveryResponder.start("127.0.0.1", 0, answering("node-a", full_record)) as r:
        peer = await RawPeer.open()
        peer.send(encode_query(NONCE), r.port)
        await asyncio.sleep(0.2)
        peer.close()

    (data, _), = peer.received
    text = data.decode()
    assert token not in text and "PRIVATE" not in text and key_pem.splitlines()[1] not in text
    answer = json.loads(data)
    assert set(answer) == {"argus", "v", "nonce", "node_id", "networks", "truncated"}
    assert answer["networks"] == [{**network(1), "ca_fingerprint": fingerprint}]


def test_malformed_networks_from_the_daemon_are_left_out_of_answers():
    data = encode_answer(NONCE, "node-a", [
        network(1), {"network_id": "net-2"}, network(3, name=None), {**network(4), "ca_fingerprint": "XYZ"},
        {**network(5), "network_id": "has space"}, {**network(6), "name": 7}, "not a dict",
    ])

    _, networks = decode_answer(data, NONCE)

    assert [n["network_id"] for n in networks] == ["net-1"]


# --- pure pieces ----------------------------------------------------------------------------


def test_rate_limiter_allows_a_burst_then_the_sustained_rate():
    limiter = RateLimiter(rate=10, burst=10)

    burst = [limiter.allow("a", now=100.0) for _ in range(12)]
    later = [limiter.allow("a", now=100.25) for _ in range(3)]  # 0.25 s refills 2.5 tokens

    assert burst == [True] * 10 + [False] * 2
    assert later == [True, True, False]
    assert limiter.allow("b", now=100.25)


def test_rate_limiter_tracks_a_bounded_number_of_sources():
    limiter = RateLimiter(rate=10, burst=1, max_keys=3)

    assert all(limiter.allow(k, now=0.0) for k in "abc")
    assert not limiter.allow("d", now=0.0)  # no room: every tracked source is still refilling
    assert limiter.allow("d", now=1.0)  # idle, full buckets are forgotten to make room


def test_a_query_round_trips_and_is_padded():
    data = encode_query(NONCE)

    assert len(data) == 400
    assert decode_query(data) == NONCE
    assert json.loads(data) == {"argus": "discover", "v": 1, "nonce": NONCE}


@pytest.mark.parametrize("nonce", ["", "0123", "0123456789ABCDEF", "0123456789abcdeg", 12])
def test_encode_query_refuses_a_malformed_nonce(nonce):
    with pytest.raises(ValueError):
        encode_query(nonce)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:47474,10.0.0.255:47474", [("127.0.0.1", 47474), ("10.0.0.255", 47474)]),
    ("127.0.0.1", [("127.0.0.1", DEFAULT_DISCOVERY_PORT)]),
    (" [::1]:5000  255.255.255.255:1 ", [("::1", 5000), ("255.255.255.255", 1)]),
    ("[::1]", [("::1", DEFAULT_DISCOVERY_PORT)]),
])
def test_parse_targets_reads_ip_port_lists(text, expected):
    assert parse_targets(text) == expected


@pytest.mark.parametrize("text", ["", "localhost:47474", "127.0.0.1:0", "127.0.0.1:70000", "::1:5000", "1.2.3:4", "127.0.0.1:x"])
def test_parse_targets_refuses_names_and_bad_ports(text):
    with pytest.raises(ValueError):
        parse_targets(text)


async def test_discover_networks_refuses_a_host_name():
    with pytest.raises(ValueError, match="not an IP address"):
        await discover_networks([("localhost", 47474)], timeout_s=0.01)


# --- broadcast, inside network namespaces this test creates -----------------------------------


@pytest.fixture
def netns_pair():
    """Namespaces A (10.213.7.1/24) and B (10.213.7.2/24, default route via the link),
    joined by a veth pair and to nothing else. Yields their names; deleted afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = f"{os.getpid() % 100000}"
    a, b = f"argus-t{tag}-a", f"argus-t{tag}-b"
    steps = [
        ["ip", "netns", "add", a], ["ip", "netns", "add", b],
        ["ip", "link", "add", f"av{tag}", "netns", a, "type", "veth", "peer", "name", f"bv{tag}", "netns", b],
        ["ip", "-n", a, "addr", "add", "10.213.7.1/24", "dev", f"av{tag}"],
        ["ip", "-n", b, "addr", "add", "10.213.7.2/24", "dev", f"bv{tag}"],
        ["ip", "-n", a, "link", "set", f"av{tag}", "up"], ["ip", "-n", b, "link", "set", f"bv{tag}", "up"],
        ["ip", "-n", a, "link", "set", "lo", "up"], ["ip", "-n", b, "link", "set", "lo", "up"],
        ["ip", "-n", b, "route", "add", "default", "dev", f"bv{tag}"],
    ]
    try:
        for step in steps:
            done = subprocess.run(step, check=False, capture_output=True, text=True, timeout=10)
            if done.returncode != 0:
                pytest.skip(f"cannot set up network namespaces ({' '.join(step)}: {done.stderr.strip()})")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)


RESPONDER_SCRIPT = """
import asyncio, sys
from worker.discovery import DiscoveryResponder
async def main():
    nets = [{"network_id": "net-1", "name": "Lab", "model_id": "m", "admin_address": "10.213.7.1:7701"}]
    r = await DiscoveryResponder.start("0.0.0.0", 47474, lambda: ("node-a", nets))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    r.close()
asyncio.run(main())
"""

DISCOVER_SCRIPT = """
import asyncio, json, sys
from worker.discovery import discover_networks
targets = [tuple(t) for t in json.loads(sys.argv[1])]
print(json.dumps(asyncio.run(discover_networks(*([targets] if targets else []), timeout_s=1.0))))
"""


@pytest.mark.e2e
def test_broadcast_discovery_between_two_network_namespaces(netns_pair):
    a, b = netns_pair
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    responder = subprocess.Popen(["ip", "netns", "exec", a, sys.executable, "-c", RESPONDER_SCRIPT], cwd=REPO, env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert responder.stdout.readline().strip() == "ready"
        results = {}
        for name, targets in (("default", []), ("directed", [["10.213.7.255", DEFAULT_DISCOVERY_PORT]])):
            done = subprocess.run(["ip", "netns", "exec", b, sys.executable, "-c", DISCOVER_SCRIPT, json.dumps(targets)],
                                  cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            results[name] = json.loads(done.stdout)
    finally:
        responder.stdin.close()
        responder.wait(timeout=10)

    for found in results.values():  # the default target is 255.255.255.255
        assert [(f["network_id"], f["node_id"], f["source"]) for f in found] == [
            ("net-1", "node-a", f"10.213.7.1:{DEFAULT_DISCOVERY_PORT}")]
