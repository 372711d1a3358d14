"""``/workers …`` — the members of a worker network: list, approve, allocate, remove (admins only).

The network is the one named after the node, else the one the chat uses
(``/network use``), else the only one this machine is in (see
``argus.commands.network.choose_network``).

``/workers remove <node>`` asks first, as ``/delete`` does: the removal
happens on ``/workers remove <node> confirm`` from the same admin within
:data:`CONFIRM_WINDOW_S`. Pending confirmations are kept in this process per
(admin, network, node); a server restart forgets them, which only means asking
again.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from argus.commands.base import ADMIN_ONLY, Command, CommandContext, CommandUsageError
from argus.commands.network import (
    ClusterReply,
    check_id,
    choose_network,
    code,
    daemon_call,
    fmt_ago,
    fmt_bytes,
    fmt_share,
    table,
)

#: Seconds a ``/workers remove`` waits for its ``confirm``.
CONFIRM_WINDOW_S = 120.0
#: Largest RAM or disk allocation accepted (1 PiB): larger is a typo.
MAX_ALLOCATION_BYTES = 1 << 50

SUBCOMMANDS = """\
**/workers** — the machines of a worker network (admins only); `[network]` may be left out when
this machine is in one network or the chat uses one (`/network use`):

- `/workers list [network]` — every member with its resources, allocation and config version, and who waits for approval
- `/workers approve <node> [network]` — let a machine that asked to join in
- `/workers reject <node> [network]` — refuse it
- `/workers allocate <node> [network] cpu=50% ram=2G disk=10G` — what the node may use (any of the three)
- `/workers remove <node> [network]` — remove a member and revoke its certificate (asks to confirm)"""

#: (user id, network id, node id) → deadline (UNIX seconds) of a ``/workers remove`` awaiting confirmation.
_pending_removals: dict[tuple[str, str, str], float] = {}


# ---------------------------------------------------------------------------
# Parsing allocations
# ---------------------------------------------------------------------------
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")
_FRACTION = re.compile(r"\d*\.?\d+")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?", re.I)
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4}


def parse_cpu(text: str) -> float:
    """``"50%"`` → 0.5, ``"0.25"`` → 0.25 (a percentage 0..100 % or a fraction 0..1).

    Raises:
        CommandUsageError: anything else (``"50"`` is refused: 50 % or 0.5?).
    """
    value = text.strip()
    if m := _PERCENT.fullmatch(value):
        share = float(m.group(1)) / 100
    elif _FRACTION.fullmatch(value):
        share = float(value)
    else:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        hint = f" (did you mean {value}%?)" if _FRACTION.fullmatch(value) else ""
        raise CommandUsageError(
            f"cpu must be a percentage from 0% to 100% or a fraction from 0 to 1, like cpu=50% or cpu=0.5, "
            f"not `{value[:20].replace('`', '')}`{hint}."
        )
    return share


def parse_size(text: str, key: str) -> int:
    """``"2G"`` → 2147483648: a number with an optional K, M, G or T (powers of 1024,
    optionally followed by B or iB); a plain number is bytes.

    Raises:
        CommandUsageError: naming ``key`` ("ram", "disk"), for anything else or above 1 PiB.
    """
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise CommandUsageError(
            f"{key} must be a size like 512M, 2G or 1.5T (K, M, G, T are powers of 1024), "
            f"not `{text[:20].replace('`', '')}`."
        )
    size = int(float(m.group(1)) * 1024 ** _POWERS.get((m.group(2) or "").lower(), 0))
    if size > MAX_ALLOCATION_BYTES:
        raise CommandUsageError(f"{key}={text} is more than 1 PiB; check the unit.")
    return size


def parse_allocation(tokens: Sequence[str]) -> dict:
    """``["cpu=50%", "ram=2G"]`` → ``{"cpu_share": 0.5, "ram_bytes": 2147483648}``
    (only the keys given).

    Raises:
        CommandUsageError: an unknown key, a key given twice, a bad value, or nothing given.
    """
    out: dict = {}
    names = {"cpu": "cpu_share", "ram": "ram_bytes", "disk": "disk_bytes"}
    for tok in tokens:
        key, _, value = tok.partition("=")
        field = names.get(key.strip().lower())
        if field is None:
            raise CommandUsageError(f"`{key[:20].replace('`', '')}` is not something to allocate; use cpu=, ram= and disk=.")
        if field in out:
            raise CommandUsageError(f"{key.lower()}= is given twice.")
        out[field] = parse_cpu(value) if field == "cpu_share" else parse_size(value, key.lower())
    if not out:
        raise CommandUsageError("Say what to allocate, e.g. /workers allocate <node> cpu=50% ram=2G disk=10G.")
    return out


def fmt_allocation(alloc: Optional[dict]) -> str:
    """``CPU 50 %, RAM 2 GiB, disk 10 GiB``; None or empty → a dash."""
    if not alloc:
        return "—"
    return (
        f"CPU {fmt_share(alloc.get('cpu_share'))}, RAM {fmt_bytes(alloc.get('ram_bytes'))}, "
        f"disk {fmt_bytes(alloc.get('disk_bytes'))}"
    )


# ---------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------
def fmt_cpu(res: dict) -> str:
    """``4 cores, load 0.52`` (+ ``, 12.3 tok/s`` when measured); unknown → a dash."""
    parts = []
    if res.get("cpu_count") is not None:
        parts.append(f"{res['cpu_count']} cores")
    if res.get("load_1m") is not None:
        parts.append(f"load {float(res['load_1m']):.2f}")
    elif res.get("cpu_percent") is not None:
        parts.append(f"{float(res['cpu_percent']):.0f} % busy")
    if res.get("speed_tokens_s") is not None:
        parts.append(f"{float(res['speed_tokens_s']):.1f} tok/s")
    return ", ".join(parts) or "—"


def fmt_ram(res: dict) -> str:
    """``3.1 GiB / 7.8 GiB`` (available / total); unknown → a dash."""
    avail, total = res.get("ram_available"), res.get("ram_total")
    if avail is None and total is None:
        return "—"
    return f"{fmt_bytes(avail)} / {fmt_bytes(total)}"


def _config_cell(version: Optional[int], current: Optional[int]) -> str:
    if version is None:
        return "—"
    if current is not None and version < current:
        return f"v{version} (behind)"
    return f"v{version}"


def _state_cell(state: Optional[str]) -> str:
    return {"self": "this machine"}.get(state or "", state or "—")


def workers_text(listing: dict, now: float) -> str:
    """``/workers list``'s reply for a ``workers_list`` result."""
    nid, current = listing.get("network_id"), listing.get("config_version")
    rows = []
    for w in listing.get("workers", []):
        res = w.get("resources") or {}
        rows.append([
            code(w.get("node_id")), str(w.get("role", "—")), _state_cell(w.get("state")),
            fmt_cpu(res), fmt_ram(res), fmt_bytes(res.get("disk_free")),
            fmt_allocation(w.get("allocation")), _config_cell(w.get("config_version"), current),
            "now" if w.get("state") == "self" else fmt_ago(w.get("last_seen"), now),
        ])
    headers = ["Node", "Role", "State", "CPU", "RAM (available / total)", "Disk free", "Allocation", "Config", "Last seen"]
    parts = [f"Members of network {code(nid)} (config version v{current}):", "", table(headers, rows)]
    pending = listing.get("pending") or []
    if pending:
        prows = []
        for p in pending:
            res = p.get("resources") or {}
            prows.append([
                code(p.get("node_id")), code(p.get("address")), fmt_cpu(res), fmt_ram(res),
                fmt_bytes(res.get("disk_free")), fmt_ago(p.get("requested_at"), now),
            ])
        parts += [
            "", "Waiting for approval:", "",
            table(["Node", "Address", "CPU", "RAM (available / total)", "Disk free", "Asked"], prows),
            "", "Let one in with `/workers approve <node>`, or refuse it with `/workers reject <node>`.",
        ]
    return "\n".join(parts)


# ---------------------------------------------------------------------------
# The subcommands
# ---------------------------------------------------------------------------
def _node_and_network(positional: Sequence[str], usage: str) -> tuple[str, Optional[str]]:
    if not 1 <= len(positional) <= 2:
        raise CommandUsageError(f"Usage: {usage}.")
    return check_id(positional[0], "node"), (positional[1] if len(positional) == 2 else None)


async def _list(ctx: CommandContext, rest: list[str]) -> str:
    if len(rest) > 1:
        raise CommandUsageError("Usage: /workers list [network].")
    nid = await choose_network(ctx, rest[0] if rest else None)
    return workers_text(await daemon_call(ctx, "workers_list", network_id=nid), ctx.clock())


async def _approve(ctx: CommandContext, rest: list[str]) -> str:
    node, given = _node_and_network(rest, "/workers approve <node> [network]")
    nid = await choose_network(ctx, given)
    result = await daemon_call(ctx, "worker_approve", network_id=nid, node_id=node)
    return f"Approved {code(result.get('node_id', node))}: it joins network {code(nid)} as {result.get('role', 'worker')}."


async def _reject(ctx: CommandContext, rest: list[str]) -> str:
    node, given = _node_and_network(rest, "/workers reject <node> [network]")
    nid = await choose_network(ctx, given)
    result = await daemon_call(ctx, "worker_reject", network_id=nid, node_id=node)
    return f"Refused {code(result.get('node_id', node))}'s request to join network {code(nid)}."


async def _allocate(ctx: CommandContext, rest: list[str]) -> str:
    usage = "/workers allocate <node> [network] cpu=50% ram=2G disk=10G"
    positional = [w for w in rest if "=" not in w]
    node, given = _node_and_network(positional, usage)
    alloc = parse_allocation([w for w in rest if "=" in w])
    nid = await choose_network(ctx, given)
    args = {"cpu_share": None, "ram_bytes": None, "disk_bytes": None, **alloc}
    result = await daemon_call(ctx, "worker_allocate", network_id=nid, node_id=node, **args)
    return (
        f"{code(result.get('node_id', node))} in network {code(nid)} may now use "
        f"{fmt_allocation(result.get('allocation'))} (config version v{result.get('config_version', '?')})."
    )


async def _remove(ctx: CommandContext, rest: list[str]) -> str:
    usage = "/workers remove <node> [network], then the same with confirm at the end"
    confirm = len(rest) > 1 and rest[-1].lower() == "confirm"
    node, given = _node_and_network(rest[:-1] if confirm else rest, usage)
    nid = await choose_network(ctx, given)
    key = (ctx.user_id, nid, node)
    now = ctx.clock()
    for k in [k for k, deadline in _pending_removals.items() if deadline < now]:
        del _pending_removals[k]
    again = f"/workers remove {node}{' ' + given if given else ''} confirm"
    if not confirm:
        listing = await daemon_call(ctx, "workers_list", network_id=nid)
        member = next((w for w in listing.get("workers", []) if w.get("node_id") == node), None)
        if member is None:
            return f"Network {code(nid)} has no member {code(node)}; see `/workers list`."
        if member.get("state") == "self":
            return f"{code(node)} is this machine; to leave the network use `/network leave {nid}`."
        _pending_removals[key] = now + CONFIRM_WINDOW_S
        return (
            f"Remove {code(node)} ({member.get('role', 'worker')}, {_state_cell(member.get('state'))}) from network "
            f"{code(nid)}? Its certificate is revoked, so it can no longer connect; to come back it needs a new "
            f"token and approval. To do it, send `{again}` within 2 minutes."
        )
    if _pending_removals.pop(key, None) is None:
        return f"Send `/workers remove {node}{' ' + given if given else ''}` first; then confirm with `{again}` within 2 minutes."
    result = await daemon_call(ctx, "worker_remove", network_id=nid, node_id=node)
    return (
        f"Removed {code(result.get('node_id', node))} from network {code(nid)}; its certificate is revoked "
        f"(config version v{result.get('config_version', '?')})."
    )


_SUBCOMMANDS = {
    "list": _list,
    "approve": _approve,
    "reject": _reject,
    "allocate": _allocate,
    "remove": _remove,
}


async def run(ctx: CommandContext, args: str) -> str:
    """``/workers <subcommand> …`` (see :data:`SUBCOMMANDS`); admins only.

    Raises:
        CommandUsageError: an unknown subcommand or bad arguments.
    """
    if not ctx.is_admin:
        return ADMIN_ONLY
    words = re.sub(r"\s*=\s*", "=", args).split()  # "cpu = 50%" reads as "cpu=50%"
    if not words:
        return SUBCOMMANDS
    handler = _SUBCOMMANDS.get(words[0].lower())
    if handler is None:
        raise CommandUsageError(f"`/workers {words[0][:20].replace('`', '')}` is not a subcommand; send /workers to see them.")
    try:
        return await handler(ctx, words[1:])
    except ClusterReply as e:
        return str(e)


COMMAND = Command(
    name="workers",
    usage="/workers list|approve|reject|allocate|remove …",
    description="Admins: a network's machines, their resources and allocations (/workers shows how).",
    icon="server",
    run=run,
)
