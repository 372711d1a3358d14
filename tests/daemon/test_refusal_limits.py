"""Issue 13, findings 9 and 10, unit by unit: the pre-authentication connection gate and the
event log's rate limit on refusals (no processes; the running daemon is tests/daemon/test_preauth_limits.py)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from websockets.protocol import State

from worker.eventlog import EventLog
from worker.link import PreAuthGate


@dataclass
class _Transport:
    certificate: bytes | None

    def get_extra_info(self, name: str):
        assert name == "ssl_object"
        return _SSL(self.certificate)


@dataclass
class _SSL:
    certificate: bytes | None

    def getpeercert(self, binary_form: bool = False):
        return self.certificate


@dataclass(eq=False)
class _Conn:
    """What the gate reads of a websockets ServerConnection: address, TLS peer certificate, state."""

    host: str
    certificate: bytes | None = None
    state: State = State.CONNECTING
    transport: _Transport = field(init=False)

    def __post_init__(self) -> None:
        self.transport = _Transport(self.certificate)

    @property
    def remote_address(self):
        return (self.host, 40000)


def test_gate_refuses_past_the_per_address_cap_and_counts_other_addresses_apart():
    gate = PreAuthGate(per_address=3, total=100)
    conns = [_Conn("192.0.2.7") for _ in range(3)]
    assert [gate.admit(c) for c in conns] == [None, None, None]
    refusal = gate.admit(_Conn("192.0.2.7"))
    assert refusal is not None and "192.0.2.7" in refusal and "at most 3" in refusal
    assert gate.admit(_Conn("192.0.2.8")) is None
    assert gate.count("192.0.2.7") == 3 and gate.count() == 4


def test_gate_frees_a_slot_on_release_and_when_the_connection_is_closed():
    gate = PreAuthGate(per_address=2, total=100)
    a, b = _Conn("192.0.2.7"), _Conn("192.0.2.7")
    assert gate.admit(a) is None and gate.admit(b) is None
    assert gate.admit(_Conn("192.0.2.7")) is not None
    gate.release(a)
    gate.release(a)  # idempotent
    assert gate.admit(_Conn("192.0.2.7")) is None
    b.state = State.CLOSED  # ended without a release (its handshake failed): pruned
    assert gate.admit(_Conn("192.0.2.7")) is None
    assert gate.count("192.0.2.7") == 2


def test_gate_total_cap_applies_to_peers_without_a_certificate_only():
    gate = PreAuthGate(per_address=2, total=4)
    for i in range(4):
        assert gate.admit(_Conn(f"192.0.2.{i}")) is None
    refusal = gate.admit(_Conn("192.0.2.50"))
    assert refusal is not None and "at most 4" in refusal
    assert gate.admit(_Conn("192.0.2.51", certificate=b"der")) is None  # a member still gets in
    assert gate.admit(_Conn("192.0.2.51", certificate=b"der")) is None
    assert gate.admit(_Conn("192.0.2.51", certificate=b"der")) is not None  # but not past its address's cap


def test_gate_rejects_caps_below_one():
    with pytest.raises(ValueError):
        PreAuthGate(per_address=0)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(log: EventLog) -> list[dict]:
    return [json.loads(line) for line in log.path.read_text().splitlines()]


def test_limited_refusals_write_the_first_per_source_then_one_summary_per_window(tmp_path):
    clock = _Clock()
    log = EventLog(tmp_path / "events.jsonl", per_source=3, total=100, window_s=60, clock=clock)
    written = [log.write_limited("join_rejected", source="192.0.2.7", network="n", reason="bad token")
               for _ in range(1000)]
    assert sum(r is not None for r in written) == 3
    log.write("join_approved", network="n", node="good")  # a legitimate event is never held back
    assert log.write_limited("connection_refused", source="192.0.2.8", network="n", reason="x") is not None
    clock.now += 61
    assert log.write_limited("join_rejected", source="192.0.2.7", network="n", reason="again") is not None
    events = _lines(log)
    assert [e["event"] for e in events].count("join_rejected") == 4
    summary = [e for e in events if e["event"] == "events_suppressed"]
    assert len(summary) == 1 and summary[0]["details"]["source"] == "192.0.2.7"
    assert summary[0]["details"]["suppressed"] == {"join_rejected": 997}
    assert summary[0]["network"] == "n" and summary[0]["details"]["window_s"] == 60
    assert any(e["event"] == "join_approved" for e in events)
    assert all(e["details"].get("source") in (None, "192.0.2.7", "192.0.2.8") for e in events)


def test_limited_refusals_are_bounded_across_sources_too(tmp_path):
    log = EventLog(tmp_path / "events.jsonl", per_source=2, total=5, window_s=60, clock=_Clock())
    for i in range(50):
        for _ in range(4):
            log.write_limited("connection_refused", source=f"2001:db8::{i}", reason="over the cap")
    log.flush_suppressed(force=True)
    events = _lines(log)
    assert sum(e["event"] == "connection_refused" for e in events) == 5
    suppressed = sum(e["details"]["suppressed"]["connection_refused"] for e in events
                     if e["event"] == "events_suppressed")
    assert suppressed == 200 - 5
    sources = {e["details"]["source"] for e in events if e["event"] == "events_suppressed"}
    assert sources == {"2001:db8::0", "2001:db8::1", "2001:db8::2", "other"}  # no summary per address


def test_closing_the_log_writes_the_pending_summary(tmp_path):
    log = EventLog(tmp_path / "events.jsonl", per_source=1, clock=_Clock())
    for _ in range(5):
        log.write_limited("join_rejected", source="192.0.2.7", reason="r")
    assert log.flush_suppressed() == []  # the window is not over yet
    log.close()
    summary = [e for e in _lines(log) if e["event"] == "events_suppressed"]
    assert summary[0]["details"]["suppressed"] == {"join_rejected": 4}
    log.close()  # nothing left: no second summary
    assert sum(e["event"] == "events_suppressed" for e in _lines(log)) == 1
