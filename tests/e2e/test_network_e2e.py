"""From the chat to the worker network, end to end: ``chainlit run app.py`` + three ``python -m worker`` processes.

Alice (the first account, so an admin) creates a network from the chat, issues
join tokens, two worker daemons on this machine join with them (one through
``python -m worker join``, one through its control endpoint), she approves
them and allocates resources, and sees resources, allocations and config
versions in ``/workers list`` and ``/network status``. Bob (not an admin) is
refused. All traffic stays on 127.0.0.1.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.support.daemons import REPO, start_daemon, wait_for
from tests.support.live_server import Chat, history_env, said, serve, sign_in, sign_up

pytestmark = pytest.mark.e2e

TOKEN = re.compile(r"argus1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


async def _ask(chat: Chat, text: str) -> str:
    events, _ = await chat.turn(text)
    replies = said(events)
    assert replies, f"no reply to {text!r}"
    return replies[-1]["output"]


async def test_admin_builds_a_network_from_the_chat_and_workers_join(tmp_path):
    admin = start_daemon(tmp_path / "admin-daemon", "admin")
    w1 = start_daemon(tmp_path / "w1", "w1")
    w2 = start_daemon(tmp_path / "w2", "w2")
    env = history_env(tmp_path, ARGUS_WORKER_DATA_DIR=str(admin.data_dir))
    try:
        with serve(tmp_path, env, "chat") as srv:
            sign_up(srv, "alice@example.com", "Alice")
            sign_up(srv, "bob@example.com", "Bob")
            async with Chat(srv, sign_in(srv, "bob@example.com"), name="Bob") as bob:
                assert "Only an administrator" in await _ask(bob, "/network list")
                assert "Only an administrator" in await _ask(bob, "/workers list")

            async with Chat(srv, sign_in(srv, "alice@example.com"), name="Alice") as alice:
                created = await _ask(alice, "/network create lab")
                nets = (await admin.call("network_list"))["networks"]
                assert len(nets) == 1 and nets[0]["name"] == "lab"
                nid = nets[0]["network_id"]
                assert nid in created

                # w1 joins the way a user on another machine would: the CLI with the pasted token
                token_reply = await _ask(alice, "/network token")
                token = TOKEN.search(token_reply).group(0)
                cli = subprocess.run([sys.executable, "-m", "worker", "join", token, "--data-dir", str(w1.data_dir)],
                                     cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                                     text=True, timeout=60)
                assert cli.returncode == 0, cli.stderr
                assert "Waiting for the admin to approve" in cli.stdout
                listing = await _ask(alice, "/workers list")
                assert w1.node_id in listing  # waiting for approval
                approved = await _ask(alice, f"/workers approve {w1.node_id}")
                assert w1.node_id in approved

                # w2 through its control endpoint
                token2 = TOKEN.search(await _ask(alice, "/network token")).group(0)
                assert token2 != token
                assert (await w2.call("network_join", token=token2))["state"] == "pending"
                await _ask(alice, f"/workers approve {w2.node_id}")

                async def both_online():
                    workers = (await admin.call("workers_list", network_id=nid))["workers"]
                    return sum(w["state"] == "online" for w in workers) == 2

                await wait_for(both_online, what="both workers online")
                listing = await _ask(alice, "/workers list")
                for w in (w1, w2):
                    row = next(line for line in listing.splitlines() if w.node_id in line)
                    assert "online" in row and "GiB" in row, row  # RAM and allocation shown

                allocated = await _ask(alice, f"/workers allocate {w1.node_id} cpu=25% ram=1G")
                assert "25" in allocated and "1 GiB" in allocated, allocated

                async def acked():
                    status = await admin.call("network_status", network_id=nid)
                    v = status["network"]["config_version"]
                    return all(status["versions"].get(w.node_id) == v for w in (w1, w2))

                await wait_for(acked, what="both workers acknowledge the allocation")
                status = await _ask(alice, "/network status")
                assert "behind" not in status and w1.node_id in status and w2.node_id in status

                # removal from the chat needs a confirmation, then the worker learns it was removed
                await _ask(alice, f"/workers remove {w2.node_id}")
                await _ask(alice, f"/workers remove {w2.node_id} confirm")

                async def w2_removed():
                    nets = (await w2.call("network_list"))["networks"]
                    return nets and nets[0]["state"] == "removed"

                await wait_for(w2_removed, what="w2 removed")
                assert w2.node_id not in await _ask(alice, "/workers list")
    finally:
        for d in (w1, w2, admin):
            d.stop()


async def test_network_commands_say_how_to_start_a_daemon_when_none_runs(tmp_path):
    env = history_env(tmp_path, ARGUS_WORKER_DATA_DIR=str(tmp_path / "no-daemon"))
    with serve(tmp_path, env, "chat") as srv:
        sign_up(srv, "alice@example.com", "Alice")
        async with Chat(srv, sign_in(srv, "alice@example.com"), name="Alice") as alice:
            reply = await _ask(alice, "/network list")
            assert "python -m worker" in reply and "--data-dir" in reply
