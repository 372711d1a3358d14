"""The structured event log: record shape, rotation, reading back, thread safety, and
that secrets (real join tokens, real PEM keys and certificates) never reach the file."""
from __future__ import annotations

import json
import re
import stat
import threading

import pytest
from cryptography.hazmat.primitives import serialization

from worker import pki
from worker.eventlog import EVENTS, REDACTED, EventLog, redact

TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture(scope="module")
def secrets_():
    """A real join token, CA private key PEM and CA certificate PEM."""
    ca_key, ca_cert = pki.create_network_ca("net-1", "Home lab")
    token = pki.issue_join_token(ca_key, "net-1", "127.0.0.1:7701", pki.ca_fingerprint(ca_cert))
    key_pem = ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    cert_pem = pki.pem(ca_cert).decode("ascii")
    return {"token": token, "key_pem": key_pem, "cert_pem": cert_pem}


def raw_text(log: EventLog) -> str:
    return "".join(p.read_text(encoding="utf-8") for p in log.files())


def pem_body(pem_text: str) -> str:
    """The base64 lines of a PEM block (what must not leak, whatever the framing)."""
    return "".join(line for line in pem_text.splitlines() if not line.startswith("-----"))


def test_an_event_is_one_json_line_with_time_network_node_event_details(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")

    log.write("join_approved", network="net-1", node="node-a", role="worker", allocation={"cpu_share": 0.5})

    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert list(rec) == ["time", "network", "node", "event", "details"]
    assert TIME_RE.fullmatch(rec["time"])
    assert rec["network"] == "net-1" and rec["node"] == "node-a" and rec["event"] == "join_approved"
    assert rec["details"] == {"role": "worker", "allocation": {"cpu_share": 0.5}}


def test_network_and_node_are_null_when_not_given(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")

    log.write("daemon_started")

    rec = log.read()[0]
    assert rec["network"] is None and rec["node"] is None and rec["details"] == {}


def test_the_log_file_is_owner_only(tmp_path):
    log = EventLog(tmp_path / "sub" / "events.jsonl")

    log.write("daemon_started")

    assert stat.S_IMODE((tmp_path / "sub" / "events.jsonl").stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["", "Join", "join approved", "x" * 65, "1st", "join-approved"])
def test_a_malformed_event_name_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match="event name"):
        EventLog(tmp_path / "e.jsonl").write(name)


def test_every_documented_event_name_is_accepted(tmp_path):
    log = EventLog(tmp_path / "e.jsonl")

    for name in sorted(EVENTS):
        log.write(name)

    assert [r["event"] for r in log.read(limit=100)] == sorted(EVENTS)


def test_read_returns_the_newest_events_last_and_filters_by_network(tmp_path):
    log = EventLog(tmp_path / "e.jsonl")
    for i in range(10):
        log.write("config_changed", network="net-a" if i % 2 else "net-b", version=i)

    assert [r["details"]["version"] for r in log.read(limit=3)] == [7, 8, 9]
    assert [r["details"]["version"] for r in log.read(limit=100, network="net-a")] == [1, 3, 5, 7, 9]
    assert log.read(limit=0) == []


def test_a_line_torn_by_a_crash_is_skipped_and_later_events_stay_whole(tmp_path):
    EventLog(tmp_path / "e.jsonl").write("daemon_started")
    with open(tmp_path / "e.jsonl", "ab") as f:  # the process died mid-write
        f.write(b'{"time": "2025-01-01T00:00:00.000Z", "event": "daem')

    log = EventLog(tmp_path / "e.jsonl")  # the restarted daemon
    assert [r["event"] for r in log.read()] == ["daemon_started"]
    log.write("daemon_started", restart=True)

    assert [r["event"] for r in log.read()] == ["daemon_started", "daemon_started"]


def test_rotation_keeps_each_file_under_max_bytes_and_only_the_newest_backups(tmp_path):
    log = EventLog(tmp_path / "e.jsonl", max_bytes=2000, backups=2)

    for i in range(200):
        log.write("config_acked", network="net-1", node="node-a", version=i)

    files = log.files()
    assert [p.name for p in files] == ["e.jsonl", "e.jsonl.1", "e.jsonl.2"]
    assert not (tmp_path / "e.jsonl.3").exists()
    assert all(p.stat().st_size <= 2000 for p in files)
    versions = [r["details"]["version"] for r in log.read(limit=10_000)]
    assert versions == list(range(versions[0], 200))  # contiguous, newest last, oldest rotated away
    assert 0 < versions[0]


def test_rotation_continues_an_existing_log_after_a_restart(tmp_path):
    EventLog(tmp_path / "e.jsonl", max_bytes=1000, backups=1).write("daemon_started", padding="x" * 900)

    log = EventLog(tmp_path / "e.jsonl", max_bytes=1000, backups=1)
    log.write("daemon_stopped", padding="y" * 900)

    assert (tmp_path / "e.jsonl.1").exists()
    assert [r["event"] for r in log.read()] == ["daemon_started", "daemon_stopped"]


def test_with_no_backups_the_log_starts_over(tmp_path):
    log = EventLog(tmp_path / "e.jsonl", max_bytes=500, backups=0)

    for i in range(50):
        log.write("error", n=i)

    assert [p.name for p in log.files()] == ["e.jsonl"]
    assert log.read(limit=1)[0]["details"]["n"] == 49


def test_concurrent_writers_produce_only_whole_json_lines(tmp_path):
    log = EventLog(tmp_path / "e.jsonl", max_bytes=64 * 1024, backups=100)
    threads, per_thread = 8, 250

    def writer(t: int) -> None:
        for i in range(per_thread):
            log.write("member_joined", network="net-1", node=f"node-{t}", i=i, text="ü" * (i % 37))

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()

    lines = raw_text(log).splitlines()
    records = [json.loads(line) for line in lines]  # every line parses
    assert len(records) == threads * per_thread
    assert {(r["node"], r["details"]["i"]) for r in records} == {
        (f"node-{t}", i) for t in range(threads) for i in range(per_thread)
    }
    assert all(p.stat().st_size <= 64 * 1024 for p in log.files())


# --- secrets --------------------------------------------------------------------------


def test_a_real_join_token_and_pem_never_reach_the_file(tmp_path, secrets_):
    log = EventLog(tmp_path / "e.jsonl")
    token, key_pem, cert_pem = secrets_["token"], secrets_["key_pem"], secrets_["cert_pem"]

    log.write("join_requested", network="net-1", node="node-b",
              note=f"admin pasted {token} into the chat",            # inside an innocent string
              attempts=[{"raw": token}, key_pem],                      # inside lists and dicts
              error=f"could not load key:\n{key_pem}",                 # a PEM inside a message
              truncated=key_pem[:200],                                 # a PEM cut before its END line
              csr=cert_pem, join_token=token, private_key=key_pem)     # secret-looking keys
    log.write("error", network=f"net-1 {token}", node=key_pem, **{f"weird {token}": 1})

    text = raw_text(log)
    assert token not in text
    assert token.split(".")[1] not in text and token.split(".")[2] not in text  # no part of it either
    for body in (pem_body(key_pem), pem_body(cert_pem)):
        for line in re.findall(r".{16}", body):
            assert line not in text
    assert "BEGIN" not in text


def test_secret_looking_keys_are_redacted_at_any_depth(tmp_path):
    log = EventLog(tmp_path / "e.jsonl")

    rec = log.write("network_created", network="net-1", token="abc", details={
        "ca": {"private_key": "abc", "fingerprint_sha256": "ff" * 32},
        "Password": "hunter2", "signature": "c2ln", "api_secret": {"nested": "x"},
        "members": [{"node": "a", "session_key": "k"}],
    })

    assert rec["details"] == {"token": REDACTED, "details": {
        "ca": {"private_key": REDACTED, "fingerprint_sha256": "ff" * 32},
        "Password": REDACTED, "signature": REDACTED, "api_secret": REDACTED,
        "members": [{"node": "a", "session_key": REDACTED}],
    }}
    assert log.read()[0]["details"] == rec["details"]
    assert "hunter2" not in raw_text(log)


def test_counts_under_secret_looking_keys_stay_readable(tmp_path):
    rec = EventLog(tmp_path / "e.jsonl").write("config_acked", prompt_tokens=12, speed_tokens_s=3.5, key_count=None)

    assert rec["details"] == {"prompt_tokens": 12, "speed_tokens_s": 3.5, "key_count": None}


def test_values_json_cannot_hold_are_written_as_text(tmp_path):
    class Thing:
        def __str__(self) -> str:
            return "a thing"

    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no")

    rec = EventLog(tmp_path / "e.jsonl").write(
        "error", blob=b"\x00\x01\x02", ratio=float("nan"), thing=Thing(), broken=Broken(), tags={"a"},
        exc=ValueError("bad input"),
    )

    assert rec["details"] == {"blob": "<3 bytes>", "ratio": "nan", "thing": "a thing", "broken": "<Broken>",
                              "tags": ["a"], "exc": "bad input"}


def test_redaction_of_very_deep_values_stops(tmp_path):
    deep: list = []
    for _ in range(100):
        deep = [deep]

    rec = EventLog(tmp_path / "e.jsonl").write("error", deep=deep)

    assert "[too deep]" in json.dumps(rec)


def test_redact_leaves_the_input_untouched():
    original = {"token": "abc", "list": [1, {"password": "p"}]}

    redact(original)

    assert original == {"token": "abc", "list": [1, {"password": "p"}]}
