"""worker.network_state: a network's config changes go through Network.commit (signed
version + 1, saved, logged, one at a time), and a member counts as online only while its
link is open and its heartbeats are fresh."""
from __future__ import annotations

import asyncio
import time

import pytest
from cryptography import x509

from worker import netconfig, pki
from worker.eventlog import EventLog
from worker.link import Credentials
from worker.network_state import OFFLINE_AFTER_HEARTBEATS, MemberLive, Network, NetworkUnavailable, NodeContext
from worker.protocol import Conflict

NET = "net-state"


def make_network(tmp_path, heartbeat_s: float = 10.0) -> Network:
    ca_key, ca_cert = pki.create_network_ca(NET, "State")
    key = pki.new_node_key()
    cert = x509.load_pem_x509_certificate(
        pki.sign_node_certificate(ca_key, ca_cert, pki.make_csr(key, "admin-1", NET), "admin-1", "admin"))
    config = netconfig.new_config(network_id=NET, name="State", model_id="m", block_count=30, port=1,
                                  admin_node_id="admin-1", admin_address="127.0.0.1:1", allocation=None,
                                  admin_serial=cert.serial_number, crl=pki.new_crl(ca_key, ca_cert),
                                  auto_approve=False)
    node = NodeContext("admin-1", tmp_path, EventLog(tmp_path / "events.jsonl"),
                       spawn=lambda coro, name: asyncio.get_running_loop().create_task(coro, name=name),
                       heartbeat_s=heartbeat_s)
    return Network(node, tmp_path / "networks" / NET, netconfig.sign(ca_key, NET, 1, config),
                   Credentials(NET, "admin-1", "admin", cert, key, ca_cert), ca_key=ca_key)


async def test_commit_signs_the_next_version_saves_it_and_logs_the_change(tmp_path):
    net = make_network(tmp_path)

    def rename(config: dict) -> None:
        config["name"] = "Renamed"

    signed = await net.commit(rename, "rename", to="Renamed")
    assert signed.version == 2 and net.signed is signed and net.config["name"] == "Renamed"
    on_disk = netconfig.load(netconfig.path_for(tmp_path, NET), net.creds.ca_cert)
    assert (on_disk.version, on_disk.config["name"]) == (2, "Renamed")
    last = net.events.read(limit=1)[-1]
    assert last["event"] == "config_changed" and last["details"]["change"] == "rename"
    assert last["details"]["version"] == 2


async def test_concurrent_commits_run_one_at_a_time_and_lose_nothing(tmp_path):
    net = make_network(tmp_path)

    def add(i: int):
        def change(config: dict) -> None:
            config.setdefault("seen", []).append(i)
        return change

    await asyncio.gather(*(net.commit(add(i), "add", i=i) for i in range(5)))
    assert net.signed.version == 6 and sorted(net.config["seen"]) == [0, 1, 2, 3, 4]


def test_a_member_is_online_only_with_an_open_link_and_fresh_heartbeats(tmp_path):
    net = make_network(tmp_path, heartbeat_s=10.0)
    now = time.time()
    assert not net.member_online("w1", now)  # never seen
    net.members_live["w1"] = MemberLive(last_seen=now, link=object())
    assert net.member_online("w1", now)
    assert not net.member_online("w1", now + 10.0 * OFFLINE_AFTER_HEARTBEATS)  # missed its heartbeats
    net.members_live["w1"].link = None
    assert not net.member_online("w1", now) and net.connected_member("w1") is None


async def test_waiting_requests_fail_with_network_unavailable_when_the_member_goes(tmp_path):
    live = MemberLive()
    fut = asyncio.get_running_loop().create_future()
    live.waiters["r1"] = fut
    live.fail_waiters("worker w1 disconnected")
    with pytest.raises(NetworkUnavailable, match="w1 disconnected"):
        await fut
    assert isinstance(NetworkUnavailable("x"), Conflict) and live.waiters == {}
