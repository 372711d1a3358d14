"""One network as this node holds it: files, credentials, signed config, live links, and the
few services every part of the daemon needs for it (commit a config change, write an event,
start a background task).

The daemon (``worker/daemon.py``) owns one :class:`Network` per network it is in and hands
it to the code that runs the model on it (``worker/distribution.py``,
``worker/inference.py``), which therefore never imports the daemon. Node-wide facts (its
id, data directory, event log, heartbeat period, model file, task spawner) come in one
:class:`NodeContext` shared by all of a node's networks.

Config changes go through :meth:`Network.commit` only: one at a time (the network's lock),
signed as version + 1 with the network CA key, saved, written to the event log, pushed to
every connected member.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.server import Server

from worker import netconfig, pki, protocol
from worker.eventlog import EventLog
from worker.link import Credentials, Link, LinkClosed
from worker.netconfig import SignedConfig
from worker.protocol import Conflict

#: Seconds between a worker's heartbeats to its admin.
DEFAULT_HEARTBEAT_S = 10.0
#: A member is shown "offline" after this many missed heartbeats.
OFFLINE_AFTER_HEARTBEATS = 3


class NetworkUnavailable(Conflict):
    """The network cannot run the model right now (not placed, a worker missing or
    disconnected, a stage that did not answer, ...); ``str()`` says what is missing."""


@dataclass
class NodeContext:
    """What every network of one node shares.

    ``spawn(coro, name)`` starts a background task the daemon cancels when it stops.
    ``heartbeat_s``: seconds between a worker's heartbeats. ``model_path``: the GGUF
    this node serves (None: the packaged default).
    """

    node_id: str
    data_dir: Path
    events: EventLog
    spawn: Callable[[Awaitable[Any], str], asyncio.Task]
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    model_path: Optional[str] = None


@dataclass
class MemberLive:
    """What the admin knows of a member right now (not in the signed config)."""

    resources: dict = field(default_factory=dict)
    last_seen: Optional[float] = None  # Unix seconds of its last message
    acked_version: int = 0
    link: Optional[Link] = None
    waiters: dict[str, asyncio.Future] = field(default_factory=dict)  # request id -> its reply (inference.RemoteStage)

    def fail_waiters(self, why: str) -> None:
        """Fail every request still waiting for this member's answer with NetworkUnavailable(why)."""
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(NetworkUnavailable(why))
        self.waiters.clear()

    def deliver(self, m: protocol.Message) -> bool:
        """Hand a reply to the request waiting for it (by request id); False when none waits."""
        waiter = self.waiters.get(m.request_id)
        if waiter is None:
            return False
        if not waiter.done():
            waiter.set_result(m)
        return True


@dataclass
class PendingJoin:
    """A joiner waiting for the admin's decision on an open connection."""

    node_id: str
    csr_pem: str
    address: str
    resources: dict
    requested_at: float
    decision: asyncio.Future  # result: ("approved", cert_pem) | ("rejected", reason)


@dataclass
class Network:
    """One network this node belongs to: its files, credentials, config and live state."""

    node: NodeContext
    dir: Path
    signed: SignedConfig
    creds: Credentials
    ca_key: Optional[ec.EllipticCurvePrivateKey] = None
    tokens: Optional[pki.TokenRegistry] = None
    server: Optional[Server] = None
    members_live: dict[str, MemberLive] = field(default_factory=dict)
    pending: dict[str, PendingJoin] = field(default_factory=dict)
    member_task: Optional[asyncio.Task] = None
    link_state: str = "connecting"  # worker side: connecting | connected | removed
    admin_link: Optional[Link] = None
    stage_host: Any = None  # worker.stage_host.StageHost: this node's blocks and KV sessions
    distribution: Any = None  # worker.distribution.Distribution (admin only): placement, sending blocks
    inference: Any = None  # worker.inference.NetworkInference (admin only): sessions, generation
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)  # config changes, one at a time

    @property
    def network_id(self) -> str:
        return self.signed.network_id

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self.node.node_id

    @property
    def events(self) -> EventLog:
        return self.node.events

    @property
    def config(self) -> dict:
        return self.signed.config

    @property
    def is_admin(self) -> bool:
        return self.ca_key is not None

    @property
    def crl(self) -> Optional[x509.CertificateRevocationList]:
        pem = self.config.get("crl_pem")
        return pki.verify_crl(pem, self.creds.ca_cert) if pem else None

    def my_port(self) -> int:
        member = self.config["members"].get(self.creds.node_id, {})
        addr = member.get("address") or self.config["admin"]["address"]
        return int(addr.rpartition(":")[2])

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task:
        """Start a background task that lives until it ends or the daemon stops."""
        return self.node.spawn(coro, name)

    def member_online(self, node_id: str, now: Optional[float] = None) -> bool:
        """True when ``node_id`` (not this node) has a link open and was heard from within
        OFFLINE_AFTER_HEARTBEATS heartbeat periods of ``now`` (Unix seconds)."""
        live = self.members_live.get(node_id)
        now = time.time() if now is None else now
        return live is not None and live.link is not None and live.last_seen is not None and \
            now - live.last_seen < self.node.heartbeat_s * OFFLINE_AFTER_HEARTBEATS

    def connected_member(self, node_id: str) -> Optional[MemberLive]:
        """The member's live state when it has a link open to this admin, else None."""
        live = self.members_live.get(node_id)
        return live if live is not None and live.link is not None else None

    # ---- config changes (admin) ------------------------------------------------------
    async def commit(self, change: Callable[[dict], None], event: str, **details: Any) -> SignedConfig:
        """Apply ``change`` to a copy of the config, sign version + 1, save, log ``config_changed``
        (``change=event`` and ``details``), push to every connected member. One at a time."""
        async with self.lock:
            config = json.loads(json.dumps(self.config))
            change(config)
            config["updated_at"] = time.time()
            signed = netconfig.sign(self.ca_key, self.network_id, self.signed.version + 1, config)
            await asyncio.to_thread(netconfig.save, self.node.data_dir, signed)
            self.signed = signed
            self.events.write("config_changed", network=self.network_id, node=self.node_id,
                              version=signed.version, change=event, **details)
            for node_id, live in list(self.members_live.items()):
                if live.link is not None and node_id in config["members"]:
                    await self.push_config(live.link)
            return signed

    async def push_config(self, link: Link) -> None:
        """Send the current signed config on ``link`` (a closed link is ignored)."""
        s = self.signed
        try:
            await link.send_new("config_update", {"config": s.config, "version": s.version,
                                                  "signature": protocol.b64(s.signature)})
        except LinkClosed:
            pass


__all__ = ["DEFAULT_HEARTBEAT_S", "MemberLive", "Network", "NetworkUnavailable", "NodeContext",
           "OFFLINE_AFTER_HEARTBEATS", "PendingJoin"]
