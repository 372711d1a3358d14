"""worker.dispatch: one message loop for every link role — a table message type -> handler,
typed error replies, STOP to end — run over a real mTLS link on loopback (in-process)."""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve

from tests.support.links import admin_and_worker
from worker import pki, protocol
from worker.dispatch import STOP, Dispatcher
from worker.link import Link, accept, open_link

TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def members():
    return admin_and_worker("Dispatch")


@dataclass
class Pair:
    admin: Link  # the accepting side (serves the member link)
    worker: Link  # the opening side


@contextlib.asynccontextmanager
async def link_pair(members):
    (_, ca_cert), admin_creds, worker_creds = members
    ca_pem = pki.pem(ca_cert)
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def handler(ws):
        accepted.set_result(await accept(ws, admin_creds, pki.NonceCache()))
        await done.wait()

    server_ctx = pki.server_context(pki.pem(admin_creds.cert), admin_creds.key, ca_pem)
    client_ctx = pki.client_context(pki.pem(worker_creds.cert), worker_creds.key, ca_pem)
    async with asyncio.timeout(TIMEOUT_S):
        async with ws_serve(handler, "127.0.0.1", 0, ssl=server_ctx, **protocol.WEBSOCKET_OPTIONS) as server:
            port = server.sockets[0].getsockname()[1]
            async with ws_connect(f"wss://127.0.0.1:{port}/", ssl=client_ctx, proxy=None, open_timeout=TIMEOUT_S,
                                  **protocol.WEBSOCKET_OPTIONS) as ws:
                worker = await open_link(ws, worker_creds, pki.NonceCache(), expected_node_id="admin-1",
                                         expected_role="admin")
                try:
                    yield Pair(await accepted, worker)
                finally:
                    done.set()


HEARTBEAT = {"resources": {}, "config_version": 1}


async def test_each_message_goes_to_its_handler_and_stop_ends_the_loop(members):
    seen: list[str] = []

    async def heartbeat(m):
        seen.append(m.message_type)

    async def leave(m):
        seen.append(m.message_type)
        return STOP

    async with link_pair(members) as pair:
        serving = asyncio.ensure_future(
            Dispatcher("a member link", {"heartbeat": heartbeat, "leave": leave}).serve(pair.admin))
        await pair.worker.send_new("heartbeat", HEARTBEAT)
        await pair.worker.send_new("leave")
        await asyncio.wait_for(serving, TIMEOUT_S)
    assert seen == ["heartbeat", "leave"]


async def test_a_message_without_a_handler_is_answered_unexpected_message_with_its_request_id(members):
    async with link_pair(members) as pair:
        serving = asyncio.ensure_future(Dispatcher("a member link", {}).serve(pair.admin))
        sent = await pair.worker.send_new("config_ack", {"version": 2})
        reply = await pair.worker.recv(timeout=TIMEOUT_S)
        serving.cancel()
    assert reply.message_type == "error"
    assert reply.payload["code"] == "unexpected_message" and reply.request_id == sent.request_id
    assert "config_ack is not expected on a member link" in reply.payload["message"]


async def test_a_protocol_error_from_a_handler_becomes_a_typed_reply_and_the_loop_goes_on(members):
    handled: list[int] = []

    async def config_ack(m):
        if m.payload["version"] == 1:
            raise protocol.Conflict("version 1 is old news")
        handled.append(m.payload["version"])
        return STOP

    async with link_pair(members) as pair:
        serving = asyncio.ensure_future(Dispatcher("a member link", {"config_ack": config_ack}).serve(pair.admin))
        first = await pair.worker.send_new("config_ack", {"version": 1})
        reply = await pair.worker.recv(timeout=TIMEOUT_S)
        await pair.worker.send_new("config_ack", {"version": 2})
        await asyncio.wait_for(serving, TIMEOUT_S)
    assert (reply.message_type, reply.payload["code"], reply.request_id) == ("error", "conflict", first.request_id)
    assert reply.payload["message"] == "version 1 is old news"
    assert handled == [2]


async def test_error_messages_go_to_on_error_and_every_message_to_on_message(members):
    errors, arrivals = [], []

    async def on_error(m):
        errors.append(m.payload["code"])
        return STOP

    async with link_pair(members) as pair:
        serving = asyncio.ensure_future(Dispatcher("a member link", {}, on_error=on_error,
                                                   on_message=lambda m: arrivals.append(m.message_type)).serve(pair.admin))
        await pair.worker.send_error(protocol.NotFound("no such session"))
        await asyncio.wait_for(serving, TIMEOUT_S)
    assert errors == ["not_found"] and arrivals == ["error"]


async def test_nothing_arriving_within_the_timeout_raises_timeout_error(members):
    async with link_pair(members) as pair:
        with pytest.raises(asyncio.TimeoutError):
            await Dispatcher("a joiner's link", {}, timeout_s=0.2).serve(pair.admin)
