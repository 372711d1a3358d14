"""/network and /workers from the chat: parsing, replies, admin refusal, no daemon.

The replies are checked against a tiny stand-in for the daemon's control
client (an async ``call`` returning the documented result shapes), which
fakes only our own interface for rendering; the real client is used for
"no daemon is running". The end-to-end run against real daemons lives with
the daemon's tests.
"""
from __future__ import annotations

import dataclasses
import os
import stat

import pytest

from argus.network_choice import CHOICE_FILE, NetworkChoice, current_network
from argus.commands import COMMANDS, CommandContext, SessionState, parse_command, run_command
from argus.commands.base import ADMIN_ONLY
from argus.commands.network import NOT_CONFIGURED, parse_ttl
from argus.commands.workers import CONFIRM_WINDOW_S, parse_allocation
from argus.config import Settings
from worker.protocol.units import format_ago, format_bytes
from worker.control import ControlClient, ControlError, DaemonUnavailable
from worker.protocol import CONTROL_COMMANDS

NOW = 1_750_000_000.0
GiB = 1024**3


def net(network_id="lab1", name="Home lab", **over) -> dict:
    base = {
        "network_id": network_id, "name": name, "model_id": "smollm2-135m", "block_count": 30,
        "role": "admin", "port": 7701, "admin_address": "192.168.1.10:7701", "config_version": 3,
        "members": 2, "auto_approve": False, "state": "serving",
    }
    return {**base, **over}


RES = {
    "cpu_count": 4, "cpu_percent": 12.0, "load_1m": 0.52, "ram_total": int(7.8 * GiB),
    "ram_available": int(3.1 * GiB), "disk_total": 500 * GiB, "disk_free": 120 * GiB,
}

WORKERS = {
    "network_id": "lab1", "config_version": 3,
    "workers": [
        {"node_id": "admin-node", "role": "admin", "state": "self", "address": None, "resources": RES,
         "allocation": None, "config_version": 3, "last_seen": None},
        {"node_id": "pi-4", "role": "worker", "state": "online", "address": "192.168.1.22:7701",
         "resources": {**RES, "cpu_count": 2}, "allocation": {"cpu_share": 0.5, "ram_bytes": 2 * GiB, "disk_bytes": 10 * GiB},
         "config_version": 2, "last_seen": NOW - 12},
        {"node_id": "old-laptop", "role": "backup", "state": "offline", "address": None, "resources": {},
         "allocation": None, "config_version": 1, "last_seen": NOW - 3 * 3600},
    ],
    "pending": [
        {"node_id": "new-box", "address": "192.168.1.30:40112", "resources": RES, "requested_at": NOW - 90},
    ],
}


class CannedDaemon:
    """Answers ``call(command, **args)`` from ``replies`` (a dict, an exception to raise,
    or a function of the arguments) and records every call; like the real client,
    it refuses arguments the protocol does not define for the command."""

    def __init__(self, **replies):
        self.replies = {
            "network_list": {"node_id": "admin-node", "networks": [net()]},
            "distribution_status": {"epoch": 1, "ready": True, "workers": []},
            **replies,
        }
        self.calls: list[tuple[str, dict]] = []

    async def call(self, command: str, **args):
        assert set(args) <= set(CONTROL_COMMANDS[command]), f"{command} takes no {set(args) - set(CONTROL_COMMANDS[command])}"
        self.calls.append((command, args))
        reply = self.replies[command]
        if isinstance(reply, Exception):
            raise reply
        return reply(**args) if callable(reply) else reply

    def commands(self) -> list[str]:
        return [c for c, _ in self.calls]


def make_ctx(store, user, daemon=None, *, admin=True, data_dir=None, clock=lambda: NOW) -> CommandContext:
    services = {}
    if daemon is not None:
        services["daemon"] = daemon
    if data_dir is not None:
        services["network_choice"] = NetworkChoice(data_dir)
    return CommandContext(
        store=store, user_id=user.id, state=SessionState(), models=[], is_admin=admin,
        services=services, clock=clock,
    )


async def run(ctx: CommandContext, text: str) -> str:
    parsed = parse_command(text)
    assert parsed is not None
    return await run_command(ctx, parsed)


# ---- registry and refusal ------------------------------------------------------------
async def test_help_lists_network_and_workers(store, alice):
    assert {"network", "workers"} <= set(COMMANDS)
    reply = await run(make_ctx(store, alice), "/help")
    assert COMMANDS["network"].usage in reply and COMMANDS["workers"].usage in reply


@pytest.mark.parametrize("text", [
    "/network", "/network list", "/network create lab", "/network token", "/network token lab1 15m",
    "/network join abc", "/network use lab1", "/network leave lab1", "/workers list",
    "/workers approve pi-4", "/workers allocate pi-4 cpu=50%", "/workers remove pi-4 confirm",
    "/workers plan", "/workers rebalance", "/workers blocks", "/network sessions", "/network sessions drop lab1.x",
])
async def test_non_admins_are_refused_before_the_daemon_is_asked(store, bob, text):
    daemon = CannedDaemon(token_issue={"token": "SECRET-TOKEN", "expires_at": NOW + 900, "network_id": "lab1"})
    reply = await run(make_ctx(store, bob, daemon, admin=False), text)
    assert reply == ADMIN_ONLY
    assert daemon.calls == []  # in particular no join token was issued, let alone shown


async def test_join_token_is_shown_to_an_admin_in_a_code_block_with_how_to_use_it(store, alice):
    daemon = CannedDaemon(token_issue={"token": "tok.ABC-123_xyz", "expires_at": NOW + 900, "network_id": "lab1"})
    reply = await run(make_ctx(store, alice, daemon), "/network token")
    assert daemon.calls[-1] == ("token_issue", {"network_id": "lab1", "ttl_s": 900})
    assert "```\ntok.ABC-123_xyz\n```" in reply
    assert "python -m worker join <token>" in reply and "/network join <token>" in reply
    assert "15 min" in reply


@pytest.mark.parametrize("text, network_id, ttl", [
    ("/network token 2h", "lab1", 7200),
    ("/network token lab1 90s", "lab1", 90),
    ("/network token other 15m", "other", 900),
    ("/network token other", "other", 900),
    ("/network token 7d", "lab1", 7 * 86400),
])
async def test_token_network_and_lifetime(store, alice, text, network_id, ttl):
    daemon = CannedDaemon(token_issue=lambda network_id, ttl_s: {"token": "t", "expires_at": NOW + ttl_s, "network_id": network_id})
    await run(make_ctx(store, alice, daemon), text)
    assert daemon.calls[-1] == ("token_issue", {"network_id": network_id, "ttl_s": ttl})


@pytest.mark.parametrize("text", ["/network token 30s", "/network token lab1 3w", "/network token lab1 8d", "/network token a b c"])
async def test_token_bad_lifetime_is_refused_without_a_token(store, alice, text):
    daemon = CannedDaemon()
    reply = await run(make_ctx(store, alice, daemon), text)
    assert "/help" in reply
    assert "token_issue" not in daemon.commands()


# ---- no daemon, daemon errors -----------------------------------------------------------
async def test_without_a_running_daemon_the_reply_says_how_to_start_one(store, alice, tmp_path):
    client = ControlClient(tmp_path / "empty-worker-dir", timeout_s=2.0)
    with pytest.raises(DaemonUnavailable) as info:
        await client.call("network_list")
    sentence = str(info.value)
    assert "python -m worker" in sentence
    for text in ("/network list", "/workers list", "/network token", "/network status"):
        assert await run(make_ctx(store, alice, client), text) == sentence


async def test_daemon_refusal_is_its_message_as_a_sentence(store, alice):
    daemon = CannedDaemon(worker_approve=ControlError("not_found", "There is no request to join from node ghost."))
    reply = await run(make_ctx(store, alice, daemon), "/workers approve ghost")
    assert reply == "There is no request to join from node ghost."
    daemon = CannedDaemon(worker_remove=ControlError("not_found", "ghost is not a member of network lab1"))
    ctx = make_ctx(store, alice, daemon)
    daemon.replies["workers_list"] = {**WORKERS, "workers": [*WORKERS["workers"], {**WORKERS["workers"][1], "node_id": "ghost"}]}
    await run(ctx, "/workers remove ghost")
    assert await run(ctx, "/workers remove ghost confirm") == "ghost is not a member of network lab1."


async def test_server_without_a_daemon_client_says_so(store, alice):
    assert await run(make_ctx(store, alice), "/network list") == NOT_CONFIGURED


async def test_unknown_subcommand_points_to_the_list(store, alice):
    reply = await run(make_ctx(store, alice, CannedDaemon()), "/network frob")
    assert "/network" in reply and "/help" in reply
    listing = await run(make_ctx(store, alice, CannedDaemon()), "/workers")
    assert "/workers allocate <node>" in listing


# ---- /network -------------------------------------------------------------------------
async def test_network_list_is_a_table_marking_the_network_in_use(store, alice, tmp_path):
    NetworkChoice(tmp_path).use("lab2")
    daemon = CannedDaemon(network_list={"node_id": "admin-node", "networks": [
        net(), net("lab2", "Office | 2nd", role="worker", state="connected", auto_approve=True),
    ]})
    reply = await run(make_ctx(store, alice, daemon, data_dir=tmp_path), "/network list")
    assert "`admin-node`" in reply
    assert "| Network | Id | Role | State |" in reply
    row2 = next(line for line in reply.splitlines() if "`lab2`" in line)
    assert "Office \\| 2nd ← in use" in row2 and "connected" in row2 and "| on |" in row2


async def test_network_list_when_in_no_network(store, alice):
    reply = await run(make_ctx(store, alice, CannedDaemon(network_list={"node_id": "n1", "networks": []})), "/network list")
    assert "in no network" in reply and "/network create" in reply


async def test_network_create_passes_name_and_auto_approve(store, alice):
    daemon = CannedDaemon(network_create=lambda name, auto_approve: {"network": net(name=name, auto_approve=auto_approve)})
    reply = await run(make_ctx(store, alice, daemon), "/network create Home lab --auto-approve")
    assert daemon.calls == [("network_create", {"name": "Home lab", "auto_approve": True})]
    assert "**Home lab**" in reply and "`lab1`" in reply and "auto-approve is on" in reply
    assert "/network token lab1" in reply


async def test_network_create_needs_a_name(store, alice):
    daemon = CannedDaemon()
    assert "/help" in await run(make_ctx(store, alice, daemon), "/network create")
    assert "/help" in await run(make_ctx(store, alice, daemon), "/network create lab --public")
    assert daemon.calls == []


async def test_network_discover_table_and_empty(store, alice):
    found = [{"network_id": "lab1", "name": "Home lab", "model_id": "smollm2-135m", "admin_address": "192.168.1.10:7701",
              "node_id": "admin-node", "ca_fingerprint": "ab" * 32}]
    reply = await run(make_ctx(store, alice, CannedDaemon(network_discover={"found": found})), "/network discover")
    assert "`192.168.1.10:7701`" in reply and "`abababababababab…`" in reply and "/network join" in reply
    empty = await run(make_ctx(store, alice, CannedDaemon(network_discover={"found": []})), "/network discover")
    assert empty.startswith("No network answered")


async def test_network_join_pending_and_joined(store, alice):
    daemon = CannedDaemon(network_join={"network_id": "lab1", "state": "pending", "message": ""})
    reply = await run(make_ctx(store, alice, daemon), "/network join `tok.ABC`")
    assert daemon.calls == [("network_join", {"token": "tok.ABC"})]
    assert "waits for the admin's approval" in reply
    daemon = CannedDaemon(network_join={"network_id": "lab1", "state": "joined", "message": "Approved automatically."})
    reply = await run(make_ctx(store, alice, daemon), "/network join tok")
    assert reply == "This machine joined network `lab1`. Approved automatically."


async def test_network_status_shows_details_and_who_is_behind(store, alice):
    daemon = CannedDaemon(network_status={"network": net(), "versions": {"admin-node": 3, "pi-4": 2}})
    reply = await run(make_ctx(store, alice, daemon), "/network status")
    assert daemon.calls[-1] == ("network_status", {"network_id": "lab1"})  # the only network
    assert "| Config version | v3 |" in reply
    assert "| `pi-4` | v2 | behind by 1 |" in reply and "| `admin-node` | v3 | up to date |" in reply


async def test_network_status_with_several_networks_and_none_in_use_lists_them(store, alice, tmp_path):
    daemon = CannedDaemon(network_list={"node_id": "n", "networks": [net(), net("lab2", "Office")]})
    reply = await run(make_ctx(store, alice, daemon, data_dir=tmp_path), "/network status")
    assert "`lab1`" in reply and "`lab2`" in reply and "/network use" in reply
    assert "network_status" not in daemon.commands()


async def test_network_use_persists_server_wide_with_owner_only_permissions(store, alice, tmp_path):
    daemon = CannedDaemon(
        network_list={"node_id": "n", "networks": [net(), net("lab2", "Office")]},
        network_status=lambda network_id: {"network": net(network_id), "versions": {}},
    )
    reply = await run(make_ctx(store, alice, daemon, data_dir=tmp_path), "/network use lab2")
    assert "now uses network **Office** (`lab2`)" in reply
    assert current_network(tmp_path) == "lab2"  # what the cluster provider reads
    assert stat.S_IMODE(os.stat(tmp_path / CHOICE_FILE).st_mode) == 0o600
    # another session (another context, same server data dir) uses it too
    await run(make_ctx(store, alice, daemon, data_dir=tmp_path), "/network status")
    assert daemon.calls[-1] == ("network_status", {"network_id": "lab2"})
    assert "`lab2`" in await run(make_ctx(store, alice, daemon, data_dir=tmp_path), "/network use")


async def test_network_use_refuses_a_network_this_machine_is_not_in(store, alice, tmp_path):
    reply = await run(make_ctx(store, alice, CannedDaemon(), data_dir=tmp_path), "/network use nope")
    assert "not in a network `nope`" in reply and "`lab1`" in reply
    assert current_network(tmp_path) is None


async def test_network_leave_forgets_the_network_in_use(store, alice, tmp_path):
    NetworkChoice(tmp_path).use("lab1")
    daemon = CannedDaemon(network_leave={"network_id": "lab1"})
    reply = await run(make_ctx(store, alice, daemon, data_dir=tmp_path), "/network leave lab1")
    assert daemon.calls == [("network_leave", {"network_id": "lab1"})]
    assert "left network `lab1`" in reply and "/network use" in reply
    assert current_network(tmp_path) is None


async def test_network_autoapprove(store, alice):
    daemon = CannedDaemon(network_set=lambda network_id, auto_approve: {"network": net(network_id, auto_approve=auto_approve)})
    reply = await run(make_ctx(store, alice, daemon), "/network autoapprove on")
    assert daemon.calls[-1] == ("network_set", {"network_id": "lab1", "auto_approve": True})
    assert reply.startswith("Auto-approve is on")
    reply = await run(make_ctx(store, alice, daemon), "/network autoapprove lab1 off")
    assert daemon.calls[-1] == ("network_set", {"network_id": "lab1", "auto_approve": False})
    assert "/help" in await run(make_ctx(store, alice, daemon), "/network autoapprove lab1 maybe")


async def test_bad_network_id_is_refused_before_the_daemon_is_asked(store, alice):
    daemon = CannedDaemon()
    reply = await run(make_ctx(store, alice, daemon), "/network leave ../etc")
    assert "is not a network id" in reply and daemon.calls == []


# ---- /workers -------------------------------------------------------------------------
async def test_workers_list_table(store, alice):
    daemon = CannedDaemon(workers_list=WORKERS)
    reply = await run(make_ctx(store, alice, daemon), "/workers list")
    assert daemon.calls[-1] == ("workers_list", {"network_id": "lab1"})
    assert "| Node | Role | State | CPU | RAM (available / total) | Disk free | Allocation | Config | Last seen |" in reply
    rows = {line.split("|")[1].strip(): line for line in reply.splitlines() if line.startswith("| `")}
    assert "this machine" in rows["`admin-node`"] and "| now |" in rows["`admin-node`"]
    pi = rows["`pi-4`"]
    assert "2 cores, load 0.52" in pi and "3.1 GiB / 7.8 GiB" in pi and "120 GiB" in pi
    assert "CPU 50 %, RAM 2 GiB, disk 10 GiB" in pi and "v2 (behind)" in pi and "12 s ago" in pi
    laptop = rows["`old-laptop`"]
    assert "offline" in laptop and "3 h ago" in laptop and "| — | — | — | — |" in laptop
    assert "Waiting for approval" in reply and "`new-box`" in reply and "1 min ago" in reply
    assert "/workers approve <node>" in reply


async def test_workers_need_a_network_named_when_there_are_several(store, alice, tmp_path):
    daemon = CannedDaemon(
        network_list={"node_id": "n", "networks": [net(), net("lab2")]}, workers_list=WORKERS,
        worker_approve={"node_id": "new-box", "role": "worker"},
    )
    reply = await run(make_ctx(store, alice, daemon, data_dir=tmp_path), "/workers list")
    assert "several networks" in reply and "/network use" in reply
    await run(make_ctx(store, alice, daemon, data_dir=tmp_path), "/workers list lab2")
    assert daemon.calls[-1] == ("workers_list", {"network_id": "lab2"})
    NetworkChoice(tmp_path).use("lab2")
    await run(make_ctx(store, alice, daemon, data_dir=tmp_path), "/workers approve new-box")
    assert daemon.calls[-1] == ("worker_approve", {"network_id": "lab2", "node_id": "new-box"})


async def test_workers_approve_and_reject(store, alice):
    daemon = CannedDaemon(worker_approve={"node_id": "new-box", "role": "worker"}, worker_reject={"node_id": "new-box"})
    reply = await run(make_ctx(store, alice, daemon), "/workers approve new-box")
    assert reply == "Approved `new-box`: it joins network `lab1` as worker."
    reply = await run(make_ctx(store, alice, daemon), "/workers reject new-box lab1")
    assert daemon.calls[-1] == ("worker_reject", {"network_id": "lab1", "node_id": "new-box"})
    assert "Refused `new-box`" in reply


@pytest.mark.parametrize("spec, expected", [
    ("cpu=50% ram=2G disk=10G", {"cpu_share": 0.5, "ram_bytes": 2 * GiB, "disk_bytes": 10 * GiB}),
    ("cpu=0.25", {"cpu_share": 0.25}),
    ("CPU = 100%  RAM=512MiB", {"cpu_share": 1.0, "ram_bytes": 512 * 1024**2}),
    ("ram=1.5g disk=1T", {"ram_bytes": int(1.5 * GiB), "disk_bytes": 1024 * GiB}),
    ("disk=4096 ram=64KB", {"disk_bytes": 4096, "ram_bytes": 64 * 1024}),
    ("cpu=0%", {"cpu_share": 0.0}),
])
async def test_workers_allocate_parses_shares_and_sizes(store, alice, spec, expected):
    daemon = CannedDaemon(worker_allocate=lambda network_id, node_id, **a: {
        "node_id": node_id, "config_version": 4,
        "allocation": {k: v if v is not None else 0 for k, v in a.items()},
    })
    reply = await run(make_ctx(store, alice, daemon), f"/workers allocate pi-4 {spec}")
    command, args = daemon.calls[-1]
    assert command == "worker_allocate"
    assert args == {"network_id": "lab1", "node_id": "pi-4", "cpu_share": None, "ram_bytes": None, "disk_bytes": None, **expected}
    assert reply.startswith("`pi-4` in network `lab1` may now use CPU") and "v4" in reply


@pytest.mark.parametrize("spec, says", [
    ("cpu=50", "did you mean 50%?"),
    ("cpu=150%", "cpu must be a percentage"),
    ("cpu=half", "cpu must be a percentage"),
    ("ram=2X", "ram must be a size like"),
    ("disk=-1G", "disk must be a size like"),
    ("disk=2000T", "more than 1 PiB"),
    ("gpu=1", "`gpu` is not something to allocate"),
    ("cpu=1% cpu=2%", "given twice"),
    ("", "Say what to allocate"),
])
async def test_workers_allocate_refuses_what_it_cannot_read(store, alice, spec, says):
    daemon = CannedDaemon()
    reply = await run(make_ctx(store, alice, daemon), f"/workers allocate pi-4 {spec}")
    assert says in reply and "/help" in reply
    assert daemon.calls == []


async def test_workers_remove_asks_then_removes_on_confirm(store, alice):
    daemon = CannedDaemon(workers_list=WORKERS, worker_remove={"node_id": "pi-4", "config_version": 4})
    ctx = make_ctx(store, alice, daemon)
    ask = await run(ctx, "/workers remove pi-4")
    assert "`/workers remove pi-4 confirm`" in ask and "2 minutes" in ask
    assert "worker_remove" not in daemon.commands()
    done = await run(ctx, "/workers remove pi-4 confirm")
    assert daemon.calls[-1] == ("worker_remove", {"network_id": "lab1", "node_id": "pi-4"})
    assert "Removed `pi-4`" in done and "revoked" in done
    again = await run(ctx, "/workers remove pi-4 confirm")  # the confirmation is used up
    assert again.startswith("Send `/workers remove pi-4` first")
    assert daemon.commands().count("worker_remove") == 1


async def test_workers_remove_confirmation_expires_and_is_per_admin(store, alice, bob):
    daemon = CannedDaemon(workers_list=WORKERS, worker_remove={"node_id": "pi-4", "config_version": 4})
    now = [NOW]
    await run(make_ctx(store, alice, daemon, clock=lambda: now[0]), "/workers remove pi-4")
    other = await run(make_ctx(store, bob, daemon, clock=lambda: now[0]), "/workers remove pi-4 confirm")
    assert other.startswith("Send `/workers remove pi-4` first")
    now[0] += CONFIRM_WINDOW_S + 1
    late = await run(make_ctx(store, alice, daemon, clock=lambda: now[0]), "/workers remove pi-4 confirm")
    assert late.startswith("Send `/workers remove pi-4` first")
    assert "worker_remove" not in daemon.commands()


async def test_workers_remove_unknown_node_and_this_machine(store, alice):
    daemon = CannedDaemon(workers_list=WORKERS)
    assert "has no member `ghost`" in await run(make_ctx(store, alice, daemon), "/workers remove ghost")
    assert "/network leave lab1" in await run(make_ctx(store, alice, daemon), "/workers remove admin-node")


# ---- small pieces ------------------------------------------------------------------------
def test_formatting_helpers():
    assert [format_bytes(n) for n in (0, 512, 1536, 2 * GiB, 120 * GiB, None)] == ["0 B", "512 B", "1.5 KiB", "2 GiB", "120 GiB", "—"]
    assert [format_ago(NOW - s, NOW) for s in (0, 12, 125, 7300, 3 * 86400)] == ["just now", "12 s ago", "2 min ago", "2 h ago", "3 d ago"]
    assert [parse_ttl(t) for t in ("900", "90s", "15m", "2h", "2 days", "")] == [900, 90, 900, 7200, None, None]
    assert parse_allocation(["cpu=12.5%"]) == {"cpu_share": 0.125}


def test_unreadable_choice_file_means_no_choice(tmp_path):
    (tmp_path / CHOICE_FILE).write_text("{not json", encoding="utf-8")
    assert current_network(tmp_path) is None
    NetworkChoice(tmp_path).use("lab1")
    assert current_network(tmp_path) == "lab1"
    assert [p.name for p in tmp_path.iterdir()] == [CHOICE_FILE]  # no temporary file left


# ---- wiring ------------------------------------------------------------------------------
def test_worker_data_dir_setting(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("ARGUS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("ARGUS_DATA_DIR", str(tmp_path / "d"))
    assert Settings.from_env(dotenv=False).worker_data_dir == tmp_path / "d" / "worker"
    monkeypatch.setenv("ARGUS_WORKER_DATA_DIR", str(tmp_path / "w"))
    assert Settings.from_env(dotenv=False).worker_data_dir == tmp_path / "w"


def test_the_chat_server_has_the_daemon_client_and_the_network_choice(store, monkeypatch, tmp_path):
    from argus.chat.hooks import JarvisArgus

    for key in list(os.environ):
        if key.startswith("ARGUS_"):
            monkeypatch.delenv(key)
    settings = dataclasses.replace(Settings.from_env(dotenv=False), data_dir=tmp_path, worker_data_dir=tmp_path / "w")
    argus = JarvisArgus(settings, store, model_loader=lambda: None)
    assert isinstance(argus.services["daemon"], ControlClient)
    NetworkChoice(tmp_path).use("lab1")
    assert argus.services["network_choice"].current_network() == "lab1"


# ---- issue 6: /workers plan | rebalance | blocks, /network sessions --------------------------
MiB = 1024**2
NOTE = "old-laptop gets no blocks: its 256 MiB allocation cannot hold one block with its KV cache."
PLACEMENT = {
    "model_id": "smollm2-135M-32c0b8179c87", "epoch": 2, "block_count": 30,
    "assignments": [
        {"node_id": "admin-node", "start": 0, "end": 14, "holds_embedding": True, "holds_head": False, "bytes": 400 * MiB},
        {"node_id": "pi-4", "start": 14, "end": 30, "holds_embedding": False, "holds_head": True, "bytes": 450 * MiB},
    ],
    "unused": ["old-laptop"], "notes": [NOTE],
}
PLAN = {"epoch": 2, "current_epoch": 1, "changes": True, "placement": PLACEMENT, "rows": [], "notes": [NOTE]}


def transfer(node, blocks, state, sent=0, total=0, message=""):
    return {"node_id": node, "block_range": blocks, "state": state, "sent_bytes": sent, "total_bytes": total,
            "message": message}


def statuses(*steps):
    """A distribution_status reply that moves through ``steps`` (lists of transfers), then stays at the last."""
    seen = []

    def reply(network_id):
        step = steps[min(len(seen), len(steps) - 1)]
        seen.append(network_id)
        return {"epoch": 2, "ready": all(w["state"] in ("loaded", "local") for w in step), "workers": step}

    return reply


class Board:
    """Records what ``/workers rebalance`` shows in the chat's task list."""

    shown: list = []

    def __init__(self):
        Board.shown = []

    async def show(self, status, tasks):
        Board.shown.append((status, list(tasks)))


@pytest.fixture
def fast_polls(monkeypatch):
    from argus.commands import workers

    monkeypatch.setattr(workers, "POLL_S", 0.0)


async def test_workers_plan_is_a_table_of_ranges_memory_and_extras_with_the_notes(store, alice):
    daemon = CannedDaemon(placement_plan=PLAN)
    reply = await run(make_ctx(store, alice, daemon), "/workers plan")
    assert daemon.calls[-1] == ("placement_plan", {"network_id": "lab1"})
    assert "| Node | Blocks | Count | Memory | Embedding / head |" in reply
    assert "| `admin-node` | 0-13 | 14 | 400 MiB | embedding |" in reply
    assert "| `pi-4` | 14-29 | 16 | 450 MiB | head |" in reply
    assert "| `old-laptop` | none | 0 | — | — |" in reply
    assert reply.count("old-laptop gets no blocks") == 1  # the daemon's notes and the placement's, once
    assert "epoch 2" in reply and "epoch 1" in reply and "`/workers rebalance`" in reply


async def test_workers_plan_without_changes_says_so(store, alice):
    daemon = CannedDaemon(placement_plan={**PLAN, "changes": False, "current_epoch": 2})
    reply = await run(make_ctx(store, alice, daemon), "/workers plan lab1")
    assert "This is the placement in use" in reply


async def test_a_malformed_plan_from_the_daemon_is_one_sentence_naming_the_field(store, alice):
    broken = {**PLAN, "placement": {**PLAN["placement"], "assignments": [{"node_id": "pi-4", "start": 14}]}}
    reply = await run(make_ctx(store, alice, CannedDaemon(placement_plan=broken)), "/workers plan")
    assert reply == "The daemon's plan for network `lab1` could not be read (assignment field 'end' is missing); see its log."
    outside = {**PLAN, "placement": {**PLAN["placement"], "assignments": [
        {"node_id": "pi-4", "start": 14, "end": 99, "holds_embedding": False, "holds_head": True, "bytes": 1}]}}
    reply = await run(make_ctx(store, alice, CannedDaemon(placement_plan=outside)), "/workers plan")
    assert "blocks 14..99 are not within 0..30" in reply


async def test_workers_plan_shortage_is_the_daemons_sentence(store, alice):
    shortage = "The allocations hold 512 MiB but the model needs 1.1 GiB; give the workers 600 MiB more RAM with /workers allocate"
    daemon = CannedDaemon(placement_plan=ControlError("conflict", shortage))
    assert await run(make_ctx(store, alice, daemon), "/workers plan") == shortage + "."


async def test_rebalance_applies_then_shows_the_transfers_until_ready(store, alice, tmp_path, fast_polls):
    daemon = CannedDaemon(
        placement_apply={**PLAN, "config_version": 5},
        distribution_status=statuses(
            [transfer("admin-node", "0-13", "local"), transfer("pi-4", "14-29", "need", 0, int(40.1 * MiB))],
            [transfer("admin-node", "0-13", "local"), transfer("pi-4", "14-29", "receiving", int(12.3 * MiB), int(40.1 * MiB))],
            [transfer("admin-node", "0-13", "loaded"), transfer("pi-4", "14-29", "verified", int(40.1 * MiB), int(40.1 * MiB))],
            [transfer("admin-node", "0-13", "loaded"), transfer("pi-4", "14-29", "loaded", int(40.1 * MiB), int(40.1 * MiB))],
        ),
    )
    ctx = make_ctx(store, alice, daemon, data_dir=tmp_path)
    ctx.services["task_board"] = Board
    reply = await run(ctx, "/workers rebalance")
    assert daemon.commands()[:2] == ["network_list", "placement_apply"]
    assert daemon.commands().count("distribution_status") == 4
    titles = [dict(tasks) for _, tasks in Board.shown]
    assert titles[0] == {"admin-node: blocks 0-13, already on this machine": "done",
                         "pi-4: blocks 14-29, 40.1 MiB waiting to be sent": "ready"}
    assert titles[1]["pi-4: blocks 14-29, 12.3/40.1 MiB (30%)"] == "running"
    assert titles[2]["pi-4: blocks 14-29, received and checked, loading"] == "running"
    assert Board.shown[-1] == ("Ready", [("admin-node: blocks 0-13, loaded", "done"), ("pi-4: blocks 14-29, loaded", "done")])
    assert Board.shown[0][0].startswith("Sending the blocks of epoch 2")
    assert "**Home lab** (`lab1`) is ready" in reply and "`/network use lab1`" in reply
    assert "| `pi-4` | 14-29 | loaded | 40.1 MiB of 40.1 MiB |" in reply and "| `admin-node` | 0-13 | loaded | — |" in reply
    NetworkChoice(tmp_path).use("lab1")
    again = await run(ctx, "/workers rebalance")
    assert "The chat uses it already." in again and "/network use" not in again


async def test_rebalance_stops_at_a_failed_transfer_and_says_why(store, alice, fast_polls):
    daemon = CannedDaemon(placement_apply=PLAN, distribution_status=statuses(
        [transfer("pi-4", "14-29", "receiving", 5 * MiB, 40 * MiB)],
        [transfer("pi-4", "14-29", "failed", 5 * MiB, 40 * MiB, "the shard's SHA-256 does not match")],
        [transfer("pi-4", "14-29", "loaded", 40 * MiB, 40 * MiB)],  # never reached
    ))
    ctx = make_ctx(store, alice, daemon)
    ctx.services["task_board"] = Board
    reply = await run(ctx, "/workers rebalance")
    assert daemon.commands().count("distribution_status") == 2
    assert Board.shown[-1] == ("Failed", [("pi-4: blocks 14-29, failed: the shard's SHA-256 does not match", "failed")])
    assert reply.startswith("Sending the blocks of network `lab1` failed (`pi-4`: the shard's SHA-256 does not match)")
    assert "/workers rebalance" in reply


async def test_rebalance_follows_the_transfers_for_ten_minutes_at_most(store, alice, fast_polls):
    now = [NOW]

    def clock():  # every reading of the clock is 100 s later
        now[0] += 100.0
        return now[0]

    daemon = CannedDaemon(placement_apply=PLAN, distribution_status=statuses(
        [transfer("pi-4", "14-29", "offline", 5 * MiB, 40 * MiB, "the worker is not connected")]))
    reply = await run(make_ctx(store, alice, daemon, clock=clock), "/workers rebalance")
    assert daemon.commands().count("distribution_status") == 6  # 600 s of looks 100 s apart
    assert "not ready after 10 minutes" in reply and "`/workers blocks`" in reply
    assert "offline, waiting for it to come back: the worker is not connected" in reply


async def test_rebalance_without_a_task_list_shows_one_progress_line(store, alice, fast_polls):
    lines = []

    async def progress(text):
        lines.append(text)

    daemon = CannedDaemon(placement_apply=PLAN, distribution_status=statuses(
        [transfer("pi-4", "14-29", "receiving", 20 * MiB, 40 * MiB)], [transfer("pi-4", "14-29", "loaded", 40 * MiB, 40 * MiB)]))
    ctx = make_ctx(store, alice, daemon)
    ctx.progress = progress
    await run(ctx, "/workers rebalance")
    assert lines == ["Sending the blocks of epoch 2… pi-4: blocks 14-29, 20.0/40.0 MiB (50%)", "Ready pi-4: blocks 14-29, loaded"]


async def test_rebalance_shortage_is_the_daemons_sentence_and_nothing_is_followed(store, alice):
    daemon = CannedDaemon(placement_apply=ControlError("conflict", "No member has RAM allocated for blocks"))
    reply = await run(make_ctx(store, alice, daemon), "/workers rebalance")
    assert reply == "No member has RAM allocated for blocks."
    assert "distribution_status" not in daemon.commands()


async def test_workers_blocks_shows_the_distribution_once(store, alice):
    daemon = CannedDaemon(distribution_status=statuses([transfer("pi-4", "14-29", "receiving", 10 * MiB, 40 * MiB)]))
    reply = await run(make_ctx(store, alice, daemon), "/workers blocks")
    assert daemon.commands().count("distribution_status") == 1
    assert "placement epoch 2, is not ready yet" in reply
    assert "| `pi-4` | 14-29 | 10.0/40.0 MiB (25%) | 10.0 MiB of 40.0 MiB |" in reply
    none = CannedDaemon(distribution_status={"epoch": None, "ready": False, "workers": []})
    assert "has no placement yet" in await run(make_ctx(store, alice, none), "/workers blocks")


async def test_network_sessions_show_titles_of_the_admins_own_conversations_only(store, alice, bob):
    mine = store.create_conversation(alice.id, "Capital | of *France*", "cluster:lab1")
    theirs = store.create_conversation(bob.id, "Bob's secret plans", "cluster:lab1")
    sessions = [
        {"session_id": f"lab1.{mine.id}", "nodes": ["admin-node", "pi-4"], "n_tokens": 1234, "bytes": int(3.5 * MiB),
         "saved_at": NOW - 180, "in_memory": False},
        {"session_id": f"lab1.{theirs.id}", "nodes": ["pi-4"], "n_tokens": 80, "bytes": MiB, "saved_at": None,
         "in_memory": True},
    ]
    daemon = CannedDaemon(sessions_list={"sessions": sessions})
    reply = await run(make_ctx(store, alice, daemon), "/network sessions")
    assert daemon.calls[-1] == ("sessions_list", {"network_id": "lab1"})
    assert "| Conversation | Session | Size | Tokens | Saved | Nodes |" in reply
    row = next(line for line in reply.splitlines() if mine.id in line)
    assert row.startswith("| Capital \\| of \\*France\\* |")
    assert "| 3.5 MiB | 1,234 | 3 min ago | `admin-node`, `pi-4` |" in row
    other = next(line for line in reply.splitlines() if theirs.id in line)
    assert "Bob" not in reply  # another user's title stays private: the id is shown
    assert other.startswith(f"| `lab1.{theirs.id}` |") and "| not yet, in memory |" in other
    assert "2, 4.5 MiB in all" in reply and "/network sessions drop <session>" in reply
    empty = await run(make_ctx(store, alice, CannedDaemon(sessions_list={"sessions": []})), "/network sessions")
    assert empty.startswith("No conversation has a session on network `lab1`")


async def test_network_sessions_drop_names_the_network_of_the_session(store, alice):
    daemon = CannedDaemon(session_drop=lambda network_id, session_id: {"dropped": 3 if network_id == "lab2" else 0})
    reply = await run(make_ctx(store, alice, daemon), "/network sessions drop lab2.abc-123")
    assert daemon.calls == [("session_drop", {"network_id": "lab2", "session_id": "lab2.abc-123"})]
    assert reply.startswith("Dropped session `lab2.abc-123` on 3 nodes of network `lab2`.")
    reply = await run(make_ctx(store, alice, daemon), "/network sessions drop lab1.gone")
    assert reply.startswith("No node of network `lab1` has session `lab1.gone`")
    bad = CannedDaemon()
    assert "is not a session id" in await run(make_ctx(store, alice, bad), "/network sessions drop ../x")
    assert bad.calls == []


async def test_help_texts_name_the_new_subcommands(store, alice):
    workers_help = await run(make_ctx(store, alice, CannedDaemon()), "/workers")
    for sub in ("/workers plan [network]", "/workers rebalance [network]", "/workers blocks [network]"):
        assert sub in workers_help
    network_help = await run(make_ctx(store, alice, CannedDaemon()), "/network")
    assert "/network sessions [network]" in network_help and "/network sessions drop <session>" in network_help
    assert "plan" in COMMANDS["workers"].usage and "sessions" in COMMANDS["network"].usage


async def test_network_use_says_when_the_network_cannot_answer_yet_or_here(store, alice, tmp_path):
    daemon = CannedDaemon(distribution_status={"epoch": 1, "ready": False, "workers": []})
    reply = await run(make_ctx(store, alice, daemon, data_dir=tmp_path), "/network use lab1")
    assert "its model answers new messages" in reply
    assert "not all loaded" in reply and "`/workers rebalance`" in reply and "the local model answers" in reply
    assert daemon.calls[-1] == ("distribution_status", {"network_id": "lab1"})
    ready = await run(make_ctx(store, alice, CannedDaemon(), data_dir=tmp_path), "/network use lab1")
    assert "not all loaded" not in ready
    as_worker = CannedDaemon(network_list={"node_id": "pi-4", "networks": [net(role="worker", state="connected")]})
    reply = await run(make_ctx(store, alice, as_worker, data_dir=tmp_path), "/network use lab1")
    assert "a worker of it, not its admin" in reply and "distribution_status" not in as_worker.commands()
    assert current_network(tmp_path) == "lab1"  # still the network the commands are about
