"""The worker daemon: one process per machine, serving its networks and a control endpoint.

``python -m worker --data-dir D`` runs :class:`Daemon` in the foreground. At
start it reads every ``network_config_<id>.json`` in ``D`` (each verified
against its network CA) and serves, with ``asyncio.gather``:

* one TLS 1.3 WebSocket server per network, on the port that network's config
  names for this node (mutual TLS against the network CA; a peer without a
  certificate may only ask to join);
* one local control endpoint (``--control-port``, default 7700, on 127.0.0.1)
  for the chat server and the CLI (``worker/control.py``);
* a UDP discovery responder (``worker/discovery.py``) answering with network
  ids, names and admin addresses, never secrets.

Where this node is a network's **admin** it holds the network CA key, issues
one-time join tokens, approves joiners (signing their CSR with role
``worker``), keeps members' allocations in the config, revokes removed members
(the CRL travels with the config), signs each new config version and pushes
it to every connected member, recording who acknowledged which version.

Where it is a **worker** it keeps one link open to the admin (reconnecting
with backoff), sends a heartbeat with its resources every ``heartbeat_s``,
and applies a config only when it is newer and signed by the network CA.

Adding or leaving a network starts or stops its server without a restart.
Every join, leave, refusal, config change and error goes to the JSON-lines
event log ``D/events.jsonl`` (``worker/eventlog.py``).

Structure: each network's state (config, lock, commit, live links) is a
``worker.network_state.Network``; on the admin, ``worker.distribution.Distribution``
places and sends the blocks and ``worker.inference.NetworkInference`` generates, both
given the Network and never this module. Control commands are the table
:data:`COMMANDS` (name -> handler, one per schema in ``protocol.CONTROL_COMMANDS``);
each link role (joiner, member, peer, the link to the admin, control) is served by a
``worker.dispatch.Dispatcher`` over its own table message type -> handler.

Files in ``D`` (directories 0700, private files 0600): ``node.json`` (this
node's id), ``control/`` (``worker/control.py``), ``network_config_<id>.json``,
``networks/<id>/`` with ``ca.pem``, ``node.pem``, ``node.key`` and, on the
admin, ``ca.key`` and ``tokens.json`` (redeemed join tokens).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import shutil
import socket
import ssl
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, serve
from websockets.exceptions import InvalidHandshake

from worker import netconfig, pki, protocol, resources
from worker.control import CONTROL_NETWORK, DEFAULT_CONTROL_PORT, ensure_control_credentials, write_endpoint
from worker.crypto_at_rest import load_or_create_key
from worker.discovery import DEFAULT_DISCOVERY_PORT, DiscoveryResponder, discover_networks
from worker.dispatch import STOP, Dispatcher
from worker.distribution import Distribution
from worker.engine import ModelFile
from worker.eventlog import EventLog
from worker.inference import NetworkInference, NetworkModel, split_session_id
from worker.link import (
    CLOSE_POLICY,
    Credentials,
    HandshakeFailed,
    Link,
    LinkClosed,
    PreAuthGate,
    accept,
    open_link,
    source_address,
)
from worker.netconfig import ConfigInvalid, SignedConfig
from worker.network_state import DEFAULT_HEARTBEAT_S, MemberLive, Network, NodeContext, PendingJoin
from worker.protocol import Conflict, InvalidPayload, Message, NotAuthorized, NotFound, ProtocolError
from worker.protocol.limits import (
    CLOSE_TOO_BIG,
    JOIN_CONVERSATION_S,
    MAX_PREAUTH_FRAME_BYTES,
    PREAUTH_OPEN_TIMEOUT_S,
)
from worker.resources import Allocation, AllocationError, default_allocation, snapshot
from worker.stage_host import StageHost

log = logging.getLogger(__name__)

#: Seconds a joiner may wait for the admin's approval on one connection.
JOIN_WAIT_S = 900.0
#: Seconds the ``network_join`` command waits for an approval before answering "pending".
JOIN_ANSWER_WAIT_S = 3.0
#: Longest wait between reconnection attempts to the admin, seconds.
MAX_BACKOFF_S = 30.0
#: Replies a worker sends to the admin's stage requests (matched by request id, see inference.RemoteStage);
#: "error" replies are matched the same way.
STAGE_REPLIES = ("forward_result", "session_info", "sessions_response", "blocks_status")
#: websockets.serve options of the network ports and the control endpoint: the protocol's options with
#: the pre-authentication frame limit (link.accept raises it once the peer is authenticated) and open timeout.
SERVER_OPTIONS: dict[str, Any] = {**protocol.WEBSOCKET_OPTIONS, "max_size": MAX_PREAUTH_FRAME_BYTES,
                                  "open_timeout": PREAUTH_OPEN_TIMEOUT_S}
#: Seconds between writes of the event log's ``events_suppressed`` summaries (see EventLog.write_limited).
SUPPRESSED_FLUSH_S = 10.0


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _url(address: str) -> str:
    return f"wss://{address}/"


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def _node_id_from_host() -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()).strip("-.")[:40] or "node"
    if not base[0].isalnum():
        base = "n" + base
    return f"{base}-{secrets.token_hex(3)}"


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


# --------------------------------------------------------------------------- the daemon


class Daemon:
    """The worker daemon of one data directory.

    Args:
        data_dir: where its files live (created 0700).
        host: the address network servers listen on (``0.0.0.0`` for a LAN).
        control_port: the control endpoint's port on 127.0.0.1 (0: any free port,
            written to ``control/endpoint.json``).
        advertise_host: the address others reach this node at (in tokens, in the
            config); default ``host`` unless that is a wildcard, then the
            address of the interface of the default route.
        discovery_port: UDP port of the discovery responder (0: any free port;
            None: no responder).
        discovery_targets: where ``network_discover`` sends its query; default
            the LAN broadcast address on :data:`DEFAULT_DISCOVERY_PORT`.
        heartbeat_s: seconds between a worker's heartbeats.
        model_path: the GGUF whose id and block count a new network records
            (default: the packaged SmolLM2).
        measure_speed: at start, measure this node's decode speed (tokens/s of
            the local engine, ``resources.measure_speed``) in the background once
            and report it as ``speed_tokens_s`` from then on (cached on disk).

    Use ``await daemon.start()`` / ``await daemon.stop()``, or ``await daemon.run()``
    which serves until ``daemon.stop_event`` is set.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        control_port: int = DEFAULT_CONTROL_PORT,
        control_host: str = "127.0.0.1",
        advertise_host: Optional[str] = None,
        discovery_port: Optional[int] = DEFAULT_DISCOVERY_PORT,
        discovery_targets: Optional[list[tuple[str, int]]] = None,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        model_path: Optional[str] = None,
        measure_speed: bool = False,
    ):
        self.measure_speed = measure_speed
        self.data_dir = _private_dir(Path(data_dir))
        self.host = host
        self.control_host = control_host
        self.control_port = control_port
        self.advertise_host = advertise_host or self._guess_advertise_host(host)
        self.discovery_port = discovery_port
        self.discovery_targets = discovery_targets or [("255.255.255.255", DEFAULT_DISCOVERY_PORT)]
        self.heartbeat_s = heartbeat_s
        self.model_path = model_path
        self.node_id = self._load_node_id()
        self.events = EventLog(self.data_dir / "events.jsonl")
        self.node = NodeContext(self.node_id, self.data_dir, self.events, self._spawn, heartbeat_s, model_path)
        self.networks: dict[str, Network] = {}
        self.joining: dict[str, dict] = {}  # network id -> {"state", "message", "task"}
        self.nonces = pki.NonceCache()
        self.preauth = PreAuthGate()  # connections to the network ports not authenticated yet
        self.stop_event = asyncio.Event()
        self._control_server: Optional[Server] = None
        self._discovery: Optional[DiscoveryResponder] = None
        self._tasks: set[asyncio.Task] = set()

    # ---- identity and files ----------------------------------------------------
    def _load_node_id(self) -> str:
        path = self.data_dir / "node.json"
        try:
            node_id = json.loads(path.read_text(encoding="utf-8"))["node_id"]
            if protocol.ID_PATTERN.fullmatch(node_id):
                return node_id
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path} is unreadable ({e}); fix or delete it") from None
        node_id = _node_id_from_host()
        pki.atomic_write(path, json.dumps({"node_id": node_id}).encode(), mode=0o600)
        return node_id

    @staticmethod
    def _guess_advertise_host(host: str) -> str:
        if host not in ("0.0.0.0", "::", ""):
            return host
        # connect() on a UDP socket sends nothing; it only picks the outgoing interface.
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect(("192.0.2.1", 9))  # TEST-NET-1 (RFC 5737): never routed anywhere real
                return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"

    def _network_dir(self, network_id: str) -> Path:
        return _private_dir(self.data_dir / "networks" / network_id)

    def resources(self) -> dict:
        return snapshot(self.data_dir)

    # ---- start / stop ----------------------------------------------------------
    async def start(self) -> None:
        """Load every network, start its server (and member link), the control endpoint
        and the discovery responder. Raises OSError when a port is taken."""
        for path in netconfig.config_files(self.data_dir):
            network_id = netconfig.network_id_of(path)
            try:
                net = self._load_network(network_id)
            except (OSError, ConfigInvalid, pki.PKIError) as e:
                log.error("network %s not loaded: %s", network_id, e)
                self.events.write("error", network=network_id, node=self.node_id, what="load", message=str(e))
                continue
            self.networks[network_id] = net
        await asyncio.gather(self._start_control(), *(self._start_network(n) for n in self.networks.values()))
        for net in self.networks.values():
            if net.is_admin and net.config.get("placement"):
                self._distribution(net).start_distribution()
        if self.discovery_port is not None:
            self._discovery = await DiscoveryResponder.start(self.host if self.host != "::" else "0.0.0.0",
                                                             self.discovery_port, self._discovery_answer)
        if self.measure_speed and resources.cached_speed(self.data_dir) is None:
            self._spawn(self._measure_speed(), "measure-speed")
        self._spawn(self._flush_suppressed_events(), "flush-suppressed-events")
        self.events.write("daemon_started", node=self.node_id, networks=sorted(self.networks),
                          control_port=self.control_port)
        log.info("node %s serving %d network(s); control on %s:%d", self.node_id, len(self.networks),
                 self.control_host, self.control_port)

    async def run(self) -> None:
        """Start, serve until ``stop_event`` is set, stop."""
        await self.start()
        try:
            await self.stop_event.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Close every server, link and task."""
        for net in list(self.networks.values()):
            await self._stop_network(net)
            if net.stage_host is not None and hasattr(net.stage_host, "close"):
                await asyncio.to_thread(net.stage_host.close)
        for task in list(self._tasks):
            task.cancel()
        if self._control_server is not None:
            self._control_server.close()
            await self._control_server.wait_closed()
        if self._discovery is not None:
            self._discovery.close()
        try:
            self.events.flush_suppressed(force=True)
        except OSError as e:
            log.warning("could not write the event log: %s", e)
        self.events.write("daemon_stopped", node=self.node_id)

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _flush_suppressed_events(self) -> None:
        """Write the event log's summaries of suppressed refusals once their window is over."""
        while True:
            await asyncio.sleep(SUPPRESSED_FLUSH_S)
            try:
                await asyncio.to_thread(self.events.flush_suppressed)
            except OSError as e:
                log.warning("could not write the event log: %s", e)

    async def _measure_speed(self) -> None:
        try:
            tokens_s = await asyncio.to_thread(resources.measure_speed, self.model_path)
            await asyncio.to_thread(resources.save_speed, self.data_dir, tokens_s)
            self.events.write("speed_measured", node=self.node_id, speed_tokens_s=round(tokens_s, 2))
        except Exception as e:  # optional: a node without a usable model simply reports no speed
            log.warning("could not measure this node's speed: %s", e)

    def _load_network(self, network_id: str) -> Network:
        d = self.data_dir / "networks" / network_id
        ca_cert = pki.load_certificate(d / "ca.pem")
        signed = netconfig.load(netconfig.path_for(self.data_dir, network_id), ca_cert)
        member = signed.config["members"].get(self.node_id)
        cert = pki.load_certificate(d / "node.pem")
        key = pki.load_private_key(d / "node.key")
        role = member["role"] if member else pki.node_identity(cert).role
        net = Network(self.node, d, signed, Credentials(network_id, self.node_id, role, cert, key, ca_cert))
        net.creds.crl_source = lambda n=net: n.crl
        if (d / "ca.key").exists():
            net.ca_key = pki.load_private_key(d / "ca.key")
            net.tokens = pki.TokenRegistry(d / "tokens.json", ca_cert)
        elif member is None:
            net.link_state = "removed"
        return net

    async def _start_control(self) -> None:
        files = await asyncio.to_thread(ensure_control_credentials, self.data_dir, self.node_id)
        ca = pki.load_certificate(files.ca_pem)
        creds = Credentials(CONTROL_NETWORK, self.node_id, "admin", pki.load_certificate(files.server_pem),
                            pki.load_private_key(files.server_key), ca)
        ctx = pki.server_context(creds.cert, creds.key, ca)
        self._control_creds = creds
        self._control_server = await serve(lambda ws: self._control_handler(ws, creds), self.control_host,
                                           self.control_port, ssl=ctx, **SERVER_OPTIONS)
        self.control_port = self._control_server.sockets[0].getsockname()[1]
        write_endpoint(files, self.control_host, self.control_port, self.node_id)

    async def _start_network(self, net: Network, port: Optional[int] = None) -> None:
        """Serve ``net`` on its port (``port`` overrides: 0 picks a free one); start the
        member link on a worker."""
        # The CRL is checked right after the TLS handshake (link.accept → peer_identity with the
        # network's *current* CRL), not inside OpenSSL: a context's CRL is frozen when it is built,
        # and an OpenSSL refusal reaches the peer as a bare EOF, while ours tells a revoked node
        # that it was revoked (so its daemon stops reconnecting) before any message is read.
        ctx = pki.server_context(net.creds.cert, net.creds.key, net.creds.ca_cert, None, allow_joiners=net.is_admin)
        listen = net.my_port() if port is None else port
        net.server = await serve(lambda ws: self._network_handler(ws, net), self.host, listen, ssl=ctx,
                                 process_request=lambda ws, request: self._admit(ws, net), **SERVER_OPTIONS)
        if not net.is_admin and net.link_state != "removed":
            net.member_task = self._spawn(self._member_loop(net), f"member-{net.network_id}")

    async def _stop_network(self, net: Network) -> None:
        if net.member_task is not None:
            net.member_task.cancel()
            net.member_task = None
        for live in net.members_live.values():
            if live.link is not None:
                await live.link.close(1001, "network stopped")
        for pending in net.pending.values():
            if not pending.decision.done():
                pending.decision.set_result(("rejected", "the admin's daemon stopped"))
        if net.server is not None:
            net.server.close()
            await net.server.wait_closed()
            net.server = None

    # ---- discovery -------------------------------------------------------------
    def _discovery_answer(self) -> tuple[str, list[dict]]:
        out = []
        for net in self.networks.values():
            if net.link_state == "removed":
                continue
            c = net.config
            out.append({"network_id": net.network_id, "name": c["name"], "model_id": c["model_id"],
                        "admin_address": c["admin"]["address"],
                        "ca_fingerprint": pki.ca_fingerprint(net.creds.ca_cert)})
        return self.node_id, out

    # ---- the network port ----------------------------------------------------------
    def _admit(self, ws: Any, net: Network) -> Any:
        """websockets' ``process_request``: count the connection as not authenticated yet, or refuse
        it with HTTP 503 when its address (or everyone without a certificate) is over the cap."""
        refusal = self.preauth.admit(ws)
        if refusal is None:
            return None
        self._refused(net.network_id, ws, refusal)
        return ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, refusal + "\n")

    def _refused(self, network_id: str, ws: Any, reason: str, *, event: str = "connection_refused",
                 node: Optional[str] = None, **details: Any) -> None:
        """Log a refusal an unauthenticated peer can cause at will, rate-limited per source address."""
        self.events.write_limited(event, source=source_address(ws), network=network_id, node=node or self.node_id,
                                  peer=_peer(ws), reason=reason, **details)

    async def _network_handler(self, ws: Any, net: Network) -> None:
        try:
            try:
                link = await accept(ws, net.creds, self.nonces)
            except HandshakeFailed as e:
                self._refused(net.network_id, ws, str(e))
                return
            if link.role != protocol.JOINER:
                self.preauth.release(ws)  # authenticated
            await self._serve_link(net, link)
        finally:
            self.preauth.release(ws)

    async def _serve_link(self, net: Network, link: Link) -> None:
        try:
            if link.role == protocol.JOINER:
                if net.is_admin:
                    await self._serve_joiner(net, link)
                else:
                    await link.send_error(NotAuthorized("this node is not the network's admin; join through the admin"))
                return
            if net.is_admin:
                await self._serve_member(net, link)
            else:
                await self._serve_peer(net, link)
        except LinkClosed:
            if link.role == protocol.JOINER and getattr(link.ws.protocol.close_sent, "code", None) == CLOSE_TOO_BIG:
                self._refused(net.network_id, link.ws, "a frame over the limit before authentication")
        except asyncio.TimeoutError:
            await link.send_error(protocol.UnexpectedMessage("nothing arrived in time; closing the connection"))
        except Exception as e:  # one bad connection must never take the daemon down
            log.exception("connection from %s failed", link.remote_address)
            self.events.write("error", network=net.network_id, node=self.node_id, peer=link.peer_node, message=str(e))
            await link.send_error(e)
        finally:
            await link.close()

    async def _serve_joiner(self, net: Network, link: Link) -> None:
        """A peer without a certificate: join_hello → join_ca, join_request → pending → decision.

        Until its join_request arrives the conversation has JOIN_CONVERSATION_S seconds in all,
        whatever it sends meanwhile (the opening's order already refuses a second join_hello;
        ``error`` messages are valid from a joiner); then the connection is closed (1008). The
        wait for the admin's decision after a valid request has its own bound (JOIN_WAIT_S).
        """
        deadline = asyncio.timeout(JOIN_CONVERSATION_S)

        async def cut_off(why: str) -> object:
            await link.send_error(protocol.UnexpectedMessage(why))
            await link.close(CLOSE_POLICY, why)
            self._refused(net.network_id, link.ws, why)
            return STOP

        async def hello(m: Message) -> None:
            await link.reply(m, "join_ca", {"ca_pem": pki.pem(net.creds.ca_cert).decode("ascii"),
                                            "admin_node_id": self.node_id})

        async def request(m: Message) -> object:
            deadline.reschedule(None)  # answered now; the wait for a decision is bounded by JOIN_WAIT_S
            await self._join_request(net, link, m)
            return STOP

        async def ignore(m: Message) -> None:  # error messages from the joiner: keep waiting
            return None

        try:
            async with deadline:
                await Dispatcher("a joiner's link", {"join_hello": hello, "join_request": request},
                                 on_error=ignore).serve(link)
        except TimeoutError:
            if not deadline.expired():
                raise
            await cut_off(f"no join request within {JOIN_CONVERSATION_S:g} s")

    async def _join_request(self, net: Network, link: Link, m: Message) -> None:
        p = m.payload
        node_id = p["node_id"]

        async def reject(reason: str) -> None:
            self._refused(net.network_id, link.ws, reason, event="join_rejected", node=node_id)
            await link.reply(m, "join_rejected", {"reason": reason})

        try:  # the token's signature first (cheap, says nothing), then the request, then spend the token
            pki.verify_join_token(p["token"], net.creds.ca_cert)
        except pki.TokenInvalid as e:
            return await reject(str(e))
        try:
            pki.check_csr(p["csr_pem"], node_id, net.network_id)
        except pki.InvalidCSR as e:
            return await reject(f"the certificate request is not acceptable: {e}")
        if node_id in net.config["members"] or node_id in net.pending:
            return await reject(f"a member named {node_id} already exists in this network")
        try:
            await asyncio.to_thread(net.tokens.redeem, p["token"])
        except (pki.TokenInvalid, pki.TokenExpired, pki.TokenReused) as e:
            return await reject(str(e))
        self.preauth.release(link.ws)  # it holds a valid one-time token: waiting for the admin is no flood
        pending = PendingJoin(node_id, p["csr_pem"], p["address"], dict(p["resources"]), time.time(),
                              asyncio.get_running_loop().create_future())
        net.pending[node_id] = pending
        self.events.write("join_requested", network=net.network_id, node=node_id, peer=link.remote_address,
                          address=p["address"])
        try:
            await link.reply(m, "join_pending")
            if net.config.get("auto_approve"):
                await self._approve(net, node_id)
            closed = asyncio.ensure_future(link.ws.wait_closed())
            done, _ = await asyncio.wait({pending.decision, closed}, timeout=JOIN_WAIT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            if pending.decision not in done:
                self.events.write("join_rejected", network=net.network_id, node=node_id,
                                  reason="the joiner left or the wait timed out before approval")
                return
            verdict, detail = pending.decision.result()
            if verdict == "approved":
                await link.reply(m, "join_approved", {
                    "certificate_pem": detail, "ca_pem": pki.pem(net.creds.ca_cert).decode("ascii"),
                    "config": net.signed.to_wire()})
            else:
                await link.reply(m, "join_rejected", {"reason": detail})
        finally:
            net.pending.pop(node_id, None)

    async def _approve(self, net: Network, node_id: str) -> str:
        pending = net.pending.get(node_id)
        if pending is None or pending.decision.done():
            raise NotFound(f"no join request from {node_id} is waiting (it may have disconnected; "
                           "ask it to join again with a new token)")
        cert_pem = pki.sign_node_certificate(net.ca_key, net.creds.ca_cert, pending.csr_pem, node_id, "worker")
        serial = x509.load_pem_x509_certificate(cert_pem).serial_number
        try:
            allocation = default_allocation(pending.resources).to_wire()
        except AllocationError:
            allocation = None

        def add(config: dict) -> None:
            config["members"][node_id] = {"role": "worker", "address": pending.address, "allocation": allocation,
                                          "serial": format(serial, "x"), "joined_at": time.time()}

        await net.commit(add, "member_added", member=node_id)
        net.members_live[node_id] = MemberLive(resources=pending.resources)
        pending.decision.set_result(("approved", cert_pem.decode("ascii")))
        self.events.write("join_approved", network=net.network_id, node=node_id, role="worker")
        self._propose_later(net, f"{node_id} joined")
        return "worker"

    def _propose_later(self, net: Network, reason: str) -> None:
        """After a join or leave, once the member had time to connect: propose a new placement."""
        async def later() -> None:
            await asyncio.sleep(min(2.0, self.heartbeat_s))
            await asyncio.to_thread(self._distribution(net).propose, reason)
        self._spawn(later(), "propose-placement")

    async def _serve_member(self, net: Network, link: Link) -> None:
        """Admin side of a member's link: heartbeats, acks, leave."""
        node_id = link.peer_node
        if node_id not in net.config["members"] or node_id == self.node_id:
            await link.send_error(NotAuthorized(f"{node_id} is not a member of network {net.network_id}"))
            self._refused(net.network_id, link.ws, "not a member", node=node_id)
            return
        live = net.members_live.setdefault(node_id, MemberLive())
        old = live.link
        live.link, live.last_seen = link, time.time()
        if hello := link.extra.get("hello"):
            live.resources = dict(hello.get("resources") or live.resources)
        if old is not None:
            await old.close(1000, "replaced by a newer connection")
        self.events.write("member_connected", network=net.network_id, node=node_id, peer=link.remote_address)
        if net.distribution is not None:
            net.distribution.member_connected(node_id)

        async def heartbeat(m: Message) -> None:
            live.resources = dict(m.payload["resources"])
            if m.payload["config_version"] < net.signed.version:
                await net.push_config(link)
            elif m.payload["config_version"] == net.signed.version:
                live.acked_version = net.signed.version

        async def config_ack(m: Message) -> None:
            live.acked_version = m.payload["version"]
            self.events.write("config_acked", network=net.network_id, node=node_id, version=m.payload["version"])

        async def leave(m: Message) -> object:
            await self._remove_member(net, node_id, reason="left")
            return STOP

        async def stage_reply(m: Message) -> None:
            if not live.deliver(m):
                raise protocol.UnexpectedMessage(f"{m.message_type} answers no request of this admin",
                                                 request_id=m.request_id)

        async def error(m: Message) -> None:
            if not live.deliver(m):
                log.info("member %s reported an error: %s", node_id, m.payload["message"])

        def seen(m: Message) -> None:
            live.last_seen = time.time()

        handlers = {"heartbeat": heartbeat, "config_ack": config_ack, "leave": leave,
                    **{t: stage_reply for t in STAGE_REPLIES}}
        try:
            await Dispatcher("a member link", handlers, on_error=error, on_message=seen).serve(link)
        finally:
            if live.link is link:
                live.link = None
                live.fail_waiters(f"worker {node_id} disconnected")
                self.events.write("member_disconnected", network=net.network_id, node=node_id)

    async def _serve_peer(self, net: Network, link: Link) -> None:
        """Worker side: a member connecting to this worker's own port (status, later inference)."""
        async def status(m: Message) -> None:
            await link.reply(m, "status_response", self._status(net))

        async def ignore(m: Message) -> None:
            return None

        await Dispatcher("this worker's own port", {"status_request": status}, on_error=ignore).serve(link)

    def _status(self, net: Network) -> dict:
        host = net.stage_host
        r = host.block_range if host is not None else None
        return {"node_id": self.node_id, "role": net.creds.role, "version": "argus-worker",
                "config_version": net.signed.version, "resources": self.resources(),
                "block_range": protocol.block_range_to_wire(r) if r is not None else None,
                "sessions": len(host.memory_sessions()) if host is not None else 0}

    def _stage_host(self, net: Network) -> StageHost:
        """This node's StageHost for ``net`` (made on first use; its key is per network, 0600)."""
        if net.stage_host is None:
            key = load_or_create_key(net.dir / "blocks.key")
            net.stage_host = StageHost(_private_dir(net.dir / "stage"), net.network_id, key)
        return net.stage_host

    def _distribution(self, net: Network) -> Distribution:
        """The admin's placement and block distribution for ``net`` (made on first use)."""
        self._admin_parts(net)
        return net.distribution

    def _inference(self, net: Network) -> NetworkInference:
        """The admin's generation and sessions for ``net`` (made on first use)."""
        self._admin_parts(net)
        return net.inference

    def _admin_parts(self, net: Network) -> None:
        if net.distribution is None:
            model = NetworkModel(self.model_path)
            net.distribution = Distribution(net, model, self._stage_host(net))
            net.inference = NetworkInference(net, model, net.distribution)

    async def _remove_member(self, net: Network, node_id: str, *, reason: str) -> SignedConfig:
        member = net.config["members"].get(node_id)
        if member is None:
            raise NotFound(f"{node_id} is not a member of network {net.network_id}")
        if node_id == self.node_id:
            raise Conflict("the admin cannot remove itself; use /network leave to dissolve the network")
        crl = pki.revoke(net.ca_key, net.creds.ca_cert, net.crl, int(member["serial"], 16))

        def drop(config: dict) -> None:
            del config["members"][node_id]
            config["crl_pem"] = pki.pem(crl).decode("ascii")

        signed = await net.commit(drop, "member_removed", member=node_id, reason=reason)
        live = net.members_live.pop(node_id, None)
        if live is not None and live.link is not None:
            try:
                await live.link.send_new("member_remove", {"node_id": node_id})
            except LinkClosed:
                pass
            await live.link.close(1000, "removed from the network")
        self.events.write("member_removed" if reason != "left" else "member_left", network=net.network_id,
                          node=node_id, reason=reason)
        self._propose_later(net, f"{node_id} {'left' if reason == 'left' else 'was removed'}")
        return signed

    # ---- worker side: the link to the admin -----------------------------------------
    async def _member_loop(self, net: Network) -> None:
        backoff = 0.5
        while net.link_state != "removed":
            admin = net.config["admin"]
            try:
                ctx = pki.client_context(net.creds.cert, net.creds.key, net.creds.ca_cert, net.crl)
                async with connect(_url(admin["address"]), ssl=ctx, open_timeout=10,
                                   **protocol.WEBSOCKET_OPTIONS) as ws:
                    link = await open_link(ws, net.creds, self.nonces, expected_node_id=admin["node_id"],
                                           expected_role="admin", resources=self.resources())
                    net.link_state, net.admin_link, backoff = "connected", link, 0.5
                    self.events.write("admin_connected", network=net.network_id, node=self.node_id)
                    await self._member_session(net, link)
            except asyncio.CancelledError:
                raise
            except HandshakeFailed as e:
                if "revoked" in str(e) or "not a member" in str(e):
                    self._mark_removed(net, str(e))
                    break
                log.warning("network %s: admin refused the link: %s", net.network_id, e)
            except (OSError, LinkClosed, InvalidHandshake, asyncio.TimeoutError, pki.PKIError) as e:
                if mentions_revocation(e):  # the admin's TLS layer refused our (revoked) certificate
                    self._mark_removed(net, f"the admin refused this node's certificate: {e}")
                    break
                log.info("network %s: admin at %s unreachable: %s", net.network_id, admin["address"], e)
            finally:
                net.admin_link = None
            if net.link_state == "removed":
                break
            net.link_state = "connecting"
            await asyncio.sleep(backoff * (0.5 + secrets.randbelow(1000) / 1000))
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _member_session(self, net: Network, link: Link) -> None:
        async def heartbeats() -> None:
            while True:
                await link.send_new("heartbeat", {"resources": self.resources(), "config_version": net.signed.version})
                await asyncio.sleep(self.heartbeat_s)

        async def config_update(m: Message) -> None:
            await self._apply_update(net, link, m)

        async def member_remove(m: Message) -> object:
            if m.payload["node_id"] != self.node_id:
                return None
            self._mark_removed(net, "the admin removed this node")
            return STOP

        async def status(m: Message) -> None:
            await link.reply(m, "status_response", self._status(net))

        async def error(m: Message) -> object:
            if m.payload["code"] == "not_authorized":
                self._mark_removed(net, m.payload["message"])
                return STOP
            log.info("admin reported: %s", m.payload["message"])
            return None

        handlers = {**self._stage_host(net).handlers(link), "config_update": config_update,
                    "member_remove": member_remove, "status_request": status}
        beat = asyncio.ensure_future(heartbeats())
        try:
            await Dispatcher("the link to the admin", handlers, on_error=error).serve(link)
        finally:
            beat.cancel()

    async def _apply_update(self, net: Network, link: Link, m: Message) -> None:
        p = m.payload
        try:
            signed = netconfig.accept_update(net.signed, net.network_id, p["version"], p["config"],
                                             protocol.unb64(p["signature"]), net.creds.ca_cert)
        except (ConfigInvalid, ValueError) as e:
            self.events.write("config_refused", network=net.network_id, node=self.node_id, version=p["version"],
                              reason=str(e))
            await link.send_error(Conflict(str(e), request_id=m.request_id))
            return
        await asyncio.to_thread(netconfig.save, self.data_dir, signed)
        net.signed = signed
        self.events.write("config_applied", network=net.network_id, node=self.node_id, version=signed.version)
        await link.reply(m, "config_ack", {"version": signed.version})
        if self.node_id not in signed.config["members"]:
            self._mark_removed(net, "the new config no longer lists this node")

    def _mark_removed(self, net: Network, why: str) -> None:
        if net.link_state != "removed":
            net.link_state = "removed"
            self.events.write("member_removed", network=net.network_id, node=self.node_id, reason=why)
            log.warning("network %s: this node was removed (%s)", net.network_id, why)

    # ---- the control endpoint --------------------------------------------------------
    async def _control_handler(self, ws: Any, creds: Credentials) -> None:
        try:
            link = await accept(ws, creds, self.nonces)
        except HandshakeFailed as e:
            self._refused(CONTROL_NETWORK, ws, str(e))
            return
        try:
            if link.role != protocol.CONTROL:
                await link.send_error(NotAuthorized("only a control client may use this endpoint"))
                return
            generations: dict[str, asyncio.Event] = {}

            async def inference_request(m: Message) -> None:
                cancel = generations.setdefault(m.session_id, asyncio.Event())
                self._spawn(self._serve_inference(link, m, cancel, generations), f"inference-{m.session_id}")

            async def inference_cancel(m: Message) -> None:
                if m.session_id in generations:
                    generations[m.session_id].set()

            async def control(m: Message) -> None:
                try:
                    result = await self.command(m.payload["command"], m.payload["args"])
                except ProtocolError:
                    raise  # the dispatcher answers it
                except Exception as e:
                    log.exception("control command %s failed", m.payload["command"])
                    self.events.write("error", node=self.node_id, what=m.payload["command"], message=str(e))
                    await link.send_error(e, m.request_id)
                    return
                await link.reply(m, "control_result", {"result": result})

            async def ignore(m: Message) -> None:
                return None

            handlers = {"inference_request": inference_request, "inference_cancel": inference_cancel,
                        "control": control}
            await Dispatcher("the control endpoint", handlers, on_error=ignore).serve(link)
        except LinkClosed:
            pass
        finally:
            await link.close()

    async def _serve_inference(self, link: Link, m: Message, cancel: asyncio.Event,
                               generations: dict[str, asyncio.Event]) -> None:
        """Answer one inference_request from the control link with streamed inference_response
        messages (or one error), running it on the network the session id names."""
        async def emit(payload: dict) -> None:
            await link.reply(m, "inference_response", payload)

        try:
            network_id, _ = split_session_id(m.session_id)
            net = self._net(network_id, admin=True)
            p = m.payload
            await self._inference(net).generate(m.session_id, list(p["input_ids"]), p["max_length"], p["sampling"],
                                                emit, cancel)
        except LinkClosed:
            cancel.set()
        except ProtocolError as e:
            await link.send_error(e, m.request_id)
        except Exception as e:
            log.exception("inference for %s failed", m.session_id)
            self.events.write("error", node=self.node_id, what="inference", message=str(e))
            await link.send_error(e, m.request_id)
        finally:
            if generations.get(m.session_id) is cancel:
                del generations[m.session_id]

    async def command(self, name: str, args: dict) -> dict:
        """Run control command ``name`` (validated ``args``, see protocol.CONTROL_COMMANDS).

        Raises ProtocolError subclasses with a sentence for the user: NotFound,
        Conflict, InvalidPayload, NotAuthorized.
        """
        handler = COMMANDS.get(name)
        if handler is None:
            raise protocol.UnknownMessageType(f"control command {name} is not implemented")
        return await handler(self, **args)

    def _net(self, network_id: str, *, admin: bool = False) -> Network:
        net = self.networks.get(network_id)
        if net is None:
            if network_id in self.joining:
                raise Conflict(f"network {network_id} is still waiting for the admin's approval")
            raise NotFound(f"this node is not in a network {network_id}; /network list shows the ones it is in")
        if admin and not net.is_admin:
            raise NotAuthorized(f"this node is a {net.creds.role} of {network_id}, not its admin; "
                                "run this on the admin's chat")
        return net

    def _summary(self, net: Network) -> dict:
        c = net.config
        state = "serving" if net.is_admin else ("removed" if net.link_state == "removed" else net.link_state)
        return {"network_id": net.network_id, "name": c["name"], "model_id": c["model_id"],
                "block_count": c["block_count"], "role": net.creds.role, "port": net.my_port(),
                "admin_address": c["admin"]["address"], "config_version": net.signed.version,
                "members": len(c["members"]), "auto_approve": bool(c.get("auto_approve")), "state": state}

    async def cmd_network_create(self, name: str, auto_approve: Optional[bool], port: Optional[int]) -> dict:
        name = name.strip()
        if not 1 <= len(name) <= 64:
            raise InvalidPayload("a network name has 1 to 64 characters")
        model_id, block_count = await asyncio.to_thread(self._model_facts)
        network_id = _new_id("net")
        d = self._network_dir(network_id)
        ca_key, ca_cert = pki.create_network_ca(network_id, name)
        node_key = pki.new_node_key()
        cert_pem = pki.sign_node_certificate(ca_key, ca_cert, pki.make_csr(node_key, self.node_id, network_id),
                                             self.node_id, "admin")
        cert = x509.load_pem_x509_certificate(cert_pem)
        crl = pki.new_crl(ca_key, ca_cert)
        creds = Credentials(network_id, self.node_id, "admin", cert, node_key, ca_cert)
        # bind first, so the config names the port really served
        probe = Network(self.node, d, netconfig.sign(ca_key, network_id, 1, {"network_id": network_id, "members": {},
                        "admin": {"address": _address(self.advertise_host, port or 0)}, "crl_pem": pki.pem(crl).decode()}),
                        creds, ca_key=ca_key)
        await self._start_network(probe, port=port or 0)
        actual = probe.server.sockets[0].getsockname()[1]
        address = _address(self.advertise_host, actual)
        try:
            allocation = default_allocation(self.resources()).to_wire()
        except AllocationError:
            allocation = None
        config = netconfig.new_config(
            network_id=network_id, name=name, model_id=model_id, block_count=block_count, port=actual,
            admin_node_id=self.node_id, admin_address=address, allocation=allocation,
            admin_serial=cert.serial_number, crl=crl, auto_approve=bool(auto_approve))
        signed = netconfig.sign(ca_key, network_id, 1, config)
        pki.save_private_key(d / "ca.key", ca_key)
        pki.save_certificate(d / "ca.pem", ca_cert)
        pki.save_private_key(d / "node.key", node_key)
        pki.save_certificate(d / "node.pem", cert)
        netconfig.save(self.data_dir, signed)
        probe.signed = signed
        probe.tokens = pki.TokenRegistry(d / "tokens.json", ca_cert)
        creds.crl_source = lambda n=probe: n.crl
        self.networks[network_id] = probe
        self.events.write("network_created", network=network_id, node=self.node_id, name=name, model_id=model_id,
                          port=actual)
        return {"network": self._summary(probe)}

    def _model_facts(self) -> tuple[str, int]:
        try:
            mf = ModelFile(NetworkModel(self.model_path).path)
        except Exception as e:  # ModelLoadError and friends: say it plainly
            raise Conflict(f"this node cannot read its model file, so it cannot create a network: {e}") from None
        return mf.model_id, mf.config.n_block

    async def cmd_network_list(self) -> dict:
        nets = [self._summary(n) for n in self.networks.values()]
        for network_id, j in self.joining.items():
            nets.append({"network_id": network_id, "name": j.get("name", "?"), "model_id": "?", "block_count": 0,
                         "role": "worker", "port": 0, "admin_address": j["admin_address"], "config_version": 0,
                         "members": 0, "auto_approve": False, "state": "pending"})
        return {"node_id": self.node_id, "networks": nets}

    async def cmd_network_status(self, network_id: str) -> dict:
        net = self._net(network_id)
        versions = {self.node_id: net.signed.version}
        if net.is_admin:
            for node_id in net.config["members"]:
                if node_id != self.node_id:
                    versions[node_id] = net.members_live.get(node_id, MemberLive()).acked_version
        return {"network": self._summary(net), "versions": versions}

    async def cmd_network_set(self, network_id: str, auto_approve: Optional[bool]) -> dict:
        net = self._net(network_id, admin=True)
        if auto_approve is not None:
            def setter(config: dict) -> None:
                config["auto_approve"] = bool(auto_approve)
            await net.commit(setter, "auto_approve", value=bool(auto_approve))
        return {"network": self._summary(net)}

    async def cmd_network_discover(self, timeout_ms: Optional[int]) -> dict:
        found = await discover_networks(self.discovery_targets, timeout_s=(timeout_ms or 1500) / 1000)
        return {"found": found}

    async def cmd_token_issue(self, network_id: str, ttl_s: Optional[int]) -> dict:
        net = self._net(network_id, admin=True)
        ttl = ttl_s or pki.JOIN_TOKEN_TTL_S
        token = pki.issue_join_token(net.ca_key, network_id, net.config["admin"]["address"],
                                     pki.ca_fingerprint(net.creds.ca_cert), ttl)
        self.events.write("token_issued", network=network_id, node=self.node_id, ttl_s=ttl)
        return {"token": token, "expires_at": time.time() + ttl, "network_id": network_id}

    async def cmd_workers_list(self, network_id: str) -> dict:
        net = self._net(network_id)
        now = time.time()
        workers = []
        for node_id, member in net.config["members"].items():
            if node_id == self.node_id:
                res, state, seen, acked = self.resources(), "self", now, net.signed.version
            else:
                live = net.members_live.get(node_id, MemberLive())
                res, seen, acked = live.resources, live.last_seen, live.acked_version
                state = "online" if net.member_online(node_id, now) else "offline"
            workers.append({"node_id": node_id, "role": member["role"], "state": state,
                            "address": member.get("address"), "resources": res,
                            "allocation": member.get("allocation"), "config_version": acked, "last_seen": seen})
        pending = [{"node_id": p.node_id, "address": p.address, "resources": p.resources,
                    "requested_at": p.requested_at} for p in net.pending.values() if not p.decision.done()]
        return {"network_id": network_id, "config_version": net.signed.version, "workers": workers,
                "pending": pending}

    async def cmd_worker_approve(self, network_id: str, node_id: str) -> dict:
        net = self._net(network_id, admin=True)
        role = await self._approve(net, node_id)
        return {"node_id": node_id, "role": role}

    async def cmd_worker_reject(self, network_id: str, node_id: str) -> dict:
        net = self._net(network_id, admin=True)
        pending = net.pending.get(node_id)
        if pending is None or pending.decision.done():
            raise NotFound(f"no join request from {node_id} is waiting")
        pending.decision.set_result(("rejected", "the admin declined this join request"))
        self.events.write("join_rejected", network=network_id, node=node_id, reason="declined by the admin")
        return {"node_id": node_id}

    async def cmd_worker_allocate(self, network_id: str, node_id: str, cpu_share: Optional[float],
                                  ram_bytes: Optional[int], disk_bytes: Optional[int]) -> dict:
        net = self._net(network_id, admin=True)
        member = net.config["members"].get(node_id)
        if member is None:
            raise NotFound(f"{node_id} is not a member of network {network_id}")
        res = self.resources() if node_id == self.node_id else net.members_live.get(node_id, MemberLive()).resources
        current = member.get("allocation")
        try:
            base = Allocation.from_wire(current) if current else default_allocation(res)
            new = Allocation(cpu_share=base.cpu_share if cpu_share is None else cpu_share,
                             ram_bytes=base.ram_bytes if ram_bytes is None else ram_bytes,
                             disk_bytes=base.disk_bytes if disk_bytes is None else disk_bytes)
            new.validate(res)
        except AllocationError as e:
            raise InvalidPayload(f"{node_id}: {e}") from None

        def setter(config: dict) -> None:
            config["members"][node_id]["allocation"] = new.to_wire()

        signed = await net.commit(setter, "allocation", member=node_id, allocation=new.to_wire())
        return {"node_id": node_id, "allocation": new.to_wire(), "config_version": signed.version}

    async def cmd_placement_plan(self, network_id: str) -> dict:
        return await self._distribution(self._net(network_id, admin=True)).plan()

    async def cmd_placement_apply(self, network_id: str) -> dict:
        return await self._distribution(self._net(network_id, admin=True)).apply()

    async def cmd_distribution_status(self, network_id: str) -> dict:
        net = self._net(network_id, admin=True)
        batcher = self._inference(net).batcher
        return {**self._distribution(net).status(), "decode_passes": batcher.passes, "decode_rows": batcher.rows}

    async def cmd_sessions_list(self, network_id: str) -> dict:
        return await self._inference(self._net(network_id, admin=True)).sessions()

    async def cmd_session_drop(self, network_id: str, session_id: str) -> dict:
        return await self._inference(self._net(network_id, admin=True)).drop_session(session_id)

    async def cmd_worker_remove(self, network_id: str, node_id: str) -> dict:
        net = self._net(network_id, admin=True)
        signed = await self._remove_member(net, node_id, reason="removed by the admin")
        return {"node_id": node_id, "config_version": signed.version}

    async def cmd_events(self, network_id: Optional[str], limit: Optional[int]) -> dict:
        return {"events": self.events.read(limit=limit or 100, network=network_id)}

    async def cmd_network_leave(self, network_id: str) -> dict:
        net = self.networks.get(network_id)
        if net is None:
            j = self.joining.pop(network_id, None)
            if j is None:
                raise NotFound(f"this node is not in a network {network_id}")
            j["task"].cancel()
            return {"network_id": network_id}
        if not net.is_admin and net.admin_link is not None and net.link_state == "connected":
            try:
                await net.admin_link.send_new("leave")
                await asyncio.sleep(0.1)  # let the admin read it before the link closes
            except LinkClosed:
                pass
        await self._stop_network(net)
        del self.networks[network_id]
        netconfig.path_for(self.data_dir, network_id).unlink(missing_ok=True)
        shutil.rmtree(net.dir, ignore_errors=True)
        self.events.write("network_left", network=network_id, node=self.node_id,
                          dissolved=net.is_admin)
        return {"network_id": network_id}

    # ---- joining (the joiner's side) ----------------------------------------------
    async def cmd_network_join(self, token: str) -> dict:
        try:
            claims = pki.parse_join_token(token)
        except pki.TokenInvalid as e:
            raise InvalidPayload(f"that is not a join token: {e}") from None
        if claims.network_id in self.networks:
            raise Conflict(f"this node is already in network {claims.network_id}")
        if claims.network_id in self.joining:
            raise Conflict(f"this node is already waiting to join {claims.network_id}")
        if claims.expires_at <= time.time():
            raise InvalidPayload("this join token has expired; ask the admin for a new one")
        answered: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = {"admin_address": claims.admin_address, "state": "connecting"}
        self.joining[claims.network_id] = entry
        entry["task"] = self._spawn(self._join(token, claims, answered), f"join-{claims.network_id}")
        try:
            first = await asyncio.wait_for(asyncio.shield(answered), 30)
        except asyncio.TimeoutError:
            raise Conflict(f"the admin at {claims.admin_address} did not answer in time") from None
        if isinstance(first, ProtocolError):
            raise first
        if first == "pending":
            try:
                done = await asyncio.wait_for(asyncio.shield(entry.setdefault("done", asyncio.get_running_loop().create_future())),
                                              JOIN_ANSWER_WAIT_S)
            except asyncio.TimeoutError:
                return {"network_id": claims.network_id, "state": "pending",
                        "message": f"Waiting for the admin to approve node {self.node_id}."}
            if isinstance(done, ProtocolError):
                raise done
        return {"network_id": claims.network_id, "state": "joined",
                "message": f"Node {self.node_id} joined network {claims.network_id}."}

    async def _join(self, token: str, claims: pki.JoinClaims, answered: asyncio.Future) -> None:
        network_id = claims.network_id
        entry = self.joining[network_id]
        done = entry.setdefault("done", asyncio.get_running_loop().create_future())

        def finish(value: Any) -> None:
            for f in (answered, done):
                if not f.done():
                    f.set_result(value)

        try:
            await self._join_exchange(token, claims, answered, finish)
        except asyncio.CancelledError:
            finish(Conflict("the join was cancelled"))
            raise
        except ProtocolError as e:
            finish(e)
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as e:
            finish(Conflict(f"could not reach the admin at {claims.admin_address}: {e}"))
        except LinkClosed:
            finish(Conflict(f"the admin at {claims.admin_address} closed the connection before deciding"))
        except Exception as e:
            log.exception("join of %s failed", network_id)
            finish(protocol.InternalError(f"joining failed: {e}"))
        finally:
            self.joining.pop(network_id, None)

    async def _join_exchange(self, token: str, claims: pki.JoinClaims, answered: asyncio.Future,
                             finish: Callable[[Any], None]) -> None:
        network_id = claims.network_id
        async with connect(_url(claims.admin_address), ssl=pki.joiner_context(), open_timeout=10,
                           **protocol.WEBSOCKET_OPTIONS) as ws:
            link = Link(ws, network_id, "admin", None, protocol.Handshake(initiator=True))
            hello = await link.send_new("join_hello")
            m = await link.recv(timeout=15)
            if m.message_type == "error":
                raise protocol.error_from_reply(m)
            ca_cert = x509.load_pem_x509_certificate(m.payload["ca_pem"].encode("ascii"))
            if pki.ca_fingerprint(ca_cert) != claims.ca_fingerprint:
                raise NotAuthorized(f"the node at {claims.admin_address} is not the admin named in the token "
                                    "(its CA fingerprint differs); the token was not sent")
            try:
                pki.peer_identity(ws.transport.get_extra_info("ssl_object"), ca_cert=ca_cert,
                                  expected_role="admin", expected_network_id=network_id,
                                  expected_node_id=m.payload["admin_node_id"])
            except pki.PKIError as e:
                raise NotAuthorized(f"the admin's certificate does not check out: {e}; the token was not sent") from None
            key = pki.new_node_key()
            port = _free_port(self.host)
            request = await link.send_new("join_request", {
                "token": token, "csr_pem": pki.make_csr(key, self.node_id, network_id).decode("ascii"),
                "node_id": self.node_id, "address": _address(self.advertise_host, port),
                "resources": self.resources()})
            del hello, request
            while True:
                m = await link.recv(timeout=JOIN_WAIT_S)
                if m.message_type == "join_pending":
                    self.joining[network_id]["state"] = "pending"
                    if not answered.done():
                        answered.set_result("pending")
                elif m.message_type == "join_rejected":
                    self.events.write("join_rejected", network=network_id, node=self.node_id,
                                      reason=m.payload["reason"])
                    raise NotAuthorized(f"the admin refused to let this node join: {m.payload['reason']}")
                elif m.message_type == "error":
                    raise protocol.error_from_reply(m)
                elif m.message_type == "join_approved":
                    await self._joined(network_id, ca_cert, key, m.payload, port)
                    finish("joined")
                    return

    async def _joined(self, network_id: str, ca_cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                      p: dict, port: int) -> None:
        cert = x509.load_pem_x509_certificate(p["certificate_pem"].encode("ascii"))
        ident = pki.node_identity(cert)
        if (ident.node_id, ident.network_id) != (self.node_id, network_id) or \
                cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise NotAuthorized("the admin sent a certificate for another node or key")
        cert.verify_directly_issued_by(ca_cert)
        signed = SignedConfig.from_wire(p["config"], ca_cert)
        d = self._network_dir(network_id)
        pki.save_certificate(d / "ca.pem", ca_cert)
        pki.save_private_key(d / "node.key", key)
        pki.save_certificate(d / "node.pem", cert)
        netconfig.save(self.data_dir, signed)
        net = Network(self.node, d, signed, Credentials(network_id, self.node_id, ident.role, cert, key, ca_cert))
        net.creds.crl_source = lambda n=net: n.crl
        self.networks[network_id] = net
        await self._start_network(net, port=port)
        self.events.write("member_joined", network=network_id, node=self.node_id, role=ident.role,
                          config_version=signed.version)


#: Control command name -> its handler, a Daemon method called with the command's validated
#: arguments (``protocol.CONTROL_COMMANDS`` holds their schemas; a test keeps the two in step).
COMMANDS: dict[str, Callable[..., Awaitable[dict]]] = {
    "network_create": Daemon.cmd_network_create,
    "network_list": Daemon.cmd_network_list,
    "network_status": Daemon.cmd_network_status,
    "network_set": Daemon.cmd_network_set,
    "network_discover": Daemon.cmd_network_discover,
    "network_join": Daemon.cmd_network_join,
    "network_leave": Daemon.cmd_network_leave,
    "token_issue": Daemon.cmd_token_issue,
    "workers_list": Daemon.cmd_workers_list,
    "worker_approve": Daemon.cmd_worker_approve,
    "worker_reject": Daemon.cmd_worker_reject,
    "worker_allocate": Daemon.cmd_worker_allocate,
    "worker_remove": Daemon.cmd_worker_remove,
    "placement_plan": Daemon.cmd_placement_plan,
    "placement_apply": Daemon.cmd_placement_apply,
    "distribution_status": Daemon.cmd_distribution_status,
    "sessions_list": Daemon.cmd_sessions_list,
    "session_drop": Daemon.cmd_session_drop,
    "events": Daemon.cmd_events,
}


def mentions_revocation(exc: BaseException) -> bool:
    """True when ``exc`` or its causes report a revoked certificate (TLS alert 44,
    certificate_revoked, RFC 8446 §6.2), as OpenSSL words it."""
    seen = 0
    while exc is not None and seen < 8:
        if "revoked" in str(exc).lower():
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _peer(ws: Any) -> str:
    addr = getattr(ws, "remote_address", None)
    return _address(addr[0], addr[1]) if addr else "?"


def _free_port(host: str) -> int:
    """A port free right now on ``host`` (the OS picks it; a tiny race remains until we bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("", "0.0.0.0", "::") else ("::" if family == socket.AF_INET6 else "0.0.0.0"), 0))
        return s.getsockname()[1]


__all__ = ["COMMANDS", "DEFAULT_HEARTBEAT_S", "Daemon", "JOIN_WAIT_S", "Network", "mentions_revocation"]
