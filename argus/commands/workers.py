"""``/workers …`` — the members of a worker network: list, approve, allocate, remove, and where
the model's blocks run: plan, rebalance, blocks (admins only).

The network is the one named after the node, else the one the chat uses
(``/network use``), else the only one this machine is in (see
``argus.commands.network.choose_network``).

``/workers remove <node>`` asks first, as ``/delete`` does: the removal
happens on ``/workers remove <node> confirm`` from the same admin within
:data:`CONFIRM_WINDOW_S`. Pending confirmations are kept in this process per
(admin, network, node); a server restart forgets them, which only means asking
again.

``/workers rebalance`` applies the placement plan (``placement_apply``), then follows the
distribution of the blocks to the workers (``distribution_status`` every :data:`POLL_S`
seconds, for at most :data:`REBALANCE_WAIT_S`) in a task list in the chat: the server's
``services["task_board"]`` makes one (an object whose ``async show(status, tasks)`` shows
``(title, state)`` pairs, state ``ready``/``running``/``done``/``failed``); without it the
progress goes to ``ctx.progress`` as one line, when there is one.
"""
from __future__ import annotations

import asyncio
import re
from typing import Any, Optional, Sequence

from argus.commands.base import ADMIN_ONLY, Command, CommandContext, CommandUsageError, escape_md
from argus.commands.network import (
    dispatch,
    check_id,
    choose_network,
    code,
    daemon_call,
    network_in_use,
    table,
)
from worker.protocol import units
from worker.protocol.units import MiB, format_ago, format_bytes, format_mib, format_share

#: Seconds a ``/workers remove`` waits for its ``confirm``.
CONFIRM_WINDOW_S = 120.0
#: Largest RAM or disk allocation accepted (1 PiB): larger is a typo.
MAX_ALLOCATION_BYTES = 1 << 50
#: Seconds between two looks at the distribution of the blocks, and the longest ``/workers
#: rebalance`` follows it (the transfers go on after that; ``/workers blocks`` shows them).
POLL_S = 0.5
REBALANCE_WAIT_S = 600.0

SUBCOMMANDS = """\
**/workers** — the machines of a worker network (admins only); `[network]` may be left out when
this machine is in one network or the chat uses one (`/network use`):

- `/workers list [network]` — every member with its resources, allocation and config version, and who waits for approval
- `/workers approve <node> [network]` — let a machine that asked to join in
- `/workers reject <node> [network]` — refuse it
- `/workers allocate <node> [network] cpu=50% ram=2G disk=10G` — what the node may use (any of the three)
- `/workers remove <node> [network]` — remove a member and revoke its certificate (asks to confirm)
- `/workers plan [network]` — which member would run which of the model's blocks, from their RAM allocations
- `/workers rebalance [network]` — apply that plan: the blocks are sent to the workers, with progress here
- `/workers blocks [network]` — which blocks each member holds now, and the transfers under way"""

#: (user id, network id, node id) → deadline (UNIX seconds) of a ``/workers remove`` awaiting confirmation.
_pending_removals: dict[tuple[str, str, str], float] = {}


# ---------------------------------------------------------------------------
# Parsing allocations
# ---------------------------------------------------------------------------
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")
_FRACTION = re.compile(r"\d*\.?\d+")


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
    try:
        size = units.parse_size(text)
    except ValueError:
        raise CommandUsageError(
            f"{key} must be a size like 512M, 2G or 1.5T (K, M, G, T are powers of 1024), "
            f"not `{text[:20].replace('`', '')}`."
        ) from None
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
        f"CPU {format_share(alloc.get('cpu_share'))}, RAM {format_bytes(alloc.get('ram_bytes'))}, "
        f"disk {format_bytes(alloc.get('disk_bytes'))}"
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
    return f"{format_bytes(avail)} / {format_bytes(total)}"


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
            fmt_cpu(res), fmt_ram(res), format_bytes(res.get("disk_free")),
            fmt_allocation(w.get("allocation")), _config_cell(w.get("config_version"), current),
            "now" if w.get("state") == "self" else format_ago(w.get("last_seen"), now),
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
                format_bytes(res.get("disk_free")), format_ago(p.get("requested_at"), now),
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


# ---------------------------------------------------------------------------
# Placement and distribution of the blocks
# ---------------------------------------------------------------------------
def _holds(holds_embedding: bool, holds_head: bool) -> str:
    parts = [name for name, flag in (("embedding", holds_embedding), ("head", holds_head)) if flag]
    return ", ".join(parts) or "—"


class PlanUnreadable(ValueError):
    """A ``placement_plan`` result whose ``placement`` is not the protocol's placement record."""


def _field(d: Any, key: str, kind: type, where: str = "placement") -> Any:
    """``d[key]`` when it is a ``kind`` (a bool is no int here). Raises PlanUnreadable."""
    if not isinstance(d, dict) or key not in d:
        raise PlanUnreadable(f"{where} field {key!r} is missing")
    value = d[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PlanUnreadable(f"{where} field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def plan_table(wire: dict) -> str:
    """The table of a placement as the daemon sends it (the wire record: ``model_id``,
    ``block_count``, ``assignments`` of ``{node_id, start, end, holds_embedding, holds_head,
    bytes}`` in chain order, ``unused`` node ids): node, blocks (first-last), count, memory,
    embedding/head; members left without blocks last.

    Raises:
        PlanUnreadable: ``wire`` is not a placement (a field missing or of the wrong type, a
            block range empty or outside ``0..block_count``).
    """
    if not isinstance(wire, dict):
        raise PlanUnreadable(f"a placement must be an object, got {type(wire).__name__}")
    total = _field(wire, "block_count", int)
    rows = []
    for item in _field(wire, "assignments", list):
        node = _field(item, "node_id", str, "assignment")
        start, end = _field(item, "start", int, "assignment"), _field(item, "end", int, "assignment")
        if not 0 <= start < end <= total:
            raise PlanUnreadable(f"assignment of {node!r}: blocks {start}..{end} are not within 0..{total}")
        holds = _holds(_field(item, "holds_embedding", bool, "assignment"), _field(item, "holds_head", bool, "assignment"))
        size = _field(item, "bytes", int, "assignment")
        if size < 0:
            raise PlanUnreadable(f"assignment of {node!r}: a negative size ({size} bytes)")
        rows.append([code(node), f"{start}-{end - 1}", str(end - start), format_bytes(size), holds])
    unused = _field(wire, "unused", list)
    if not all(isinstance(n, str) for n in unused):
        raise PlanUnreadable("placement field 'unused' must be a list of node ids")
    rows += [[code(node), "none", "0", "—", "—"] for node in unused]
    return table(["Node", "Blocks", "Count", "Memory", "Embedding / head"], rows)


def plan_text(nid: str, result: dict) -> str:
    """``/workers plan``'s reply for a ``placement_plan`` result."""
    wire = result.get("placement") or {}
    try:
        grid = plan_table(wire)
    except PlanUnreadable as e:
        return f"The daemon's plan for network {code(nid)} could not be read ({e}); see its log."
    epoch, current = result.get("epoch"), result.get("current_epoch")
    was = f"the placement in use is epoch {current}" if current is not None else "no placement is in use yet"
    head = (
        f"Placement plan for network {code(nid)}: the {wire.get('block_count', '?')} blocks of "
        f"{code(wire.get('model_id'))} as epoch {epoch} ({was})."
    )
    notes = list(dict.fromkeys([*(result.get("notes") or []), *(wire.get("notes") or [])]))
    parts = [head, "", grid]
    if notes:
        parts += ["", "Notes:", *(f"- {escape_md(str(n))}" for n in notes)]
    if result.get("changes", True):
        parts += ["", "Apply it with `/workers rebalance`: each worker is sent the blocks it lacks."]
    else:
        parts += ["", "This is the placement in use; `/workers rebalance` only makes sure every worker has its blocks."]
    return "\n".join(parts)


async def _plan(ctx: CommandContext, rest: list[str]) -> str:
    if len(rest) > 1:
        raise CommandUsageError("Usage: /workers plan [network].")
    nid = await choose_network(ctx, rest[0] if rest else None)
    return plan_text(nid, await daemon_call(ctx, "placement_plan", network_id=nid))


#: distribution state → (the task's state in the task list, the words after the block range;
#: None: the bytes received so far)
_TRANSFER = {
    "local": ("done", "already on this machine"),
    "loaded": ("done", "loaded"),
    "verified": ("running", "received and checked, loading"),
    "receiving": ("running", None),
    "need": ("ready", "waiting to be sent"),
    "failed": ("failed", "failed"),
    "offline": ("ready", "offline, waiting for it to come back"),
}


def transfer_task(w: dict) -> tuple[str, str]:
    """The task-list line of one worker of a ``distribution_status`` result and its task state
    (``ready``, ``running``, ``done``, ``failed``), e.g.
    ``("node-b: blocks 15-29, 12.3/40.1 MiB (31%)", "running")``."""
    state = str(w.get("state", ""))
    task_state, words = _TRANSFER.get(state, ("ready", state or "unknown"))
    sent, total = int(w.get("sent_bytes") or 0), int(w.get("total_bytes") or 0)
    if words is None:
        percent = f" ({100 * sent // total}%)" if total else ""
        words = f"{sent / MiB:.1f}/{total / MiB:.1f} MiB{percent}"
    elif state == "need" and total:
        words = f"{format_mib(total)} {words}"
    message = " ".join(str(w.get("message") or "").split())
    if message and state in ("failed", "offline"):
        words += f": {message}"
    return f"{w.get('node_id', '?')}: blocks {w.get('block_range', '?')}, {words}", task_state


def blocks_table(status: dict) -> str:
    """The table of a ``distribution_status`` result: node, blocks, state, bytes sent (a dash
    when nothing is sent: the node has its blocks already)."""
    rows = []
    for w in status.get("workers") or []:
        title, _ = transfer_task(w)
        total = w.get("total_bytes") or 0
        sent = f"{format_mib(w.get('sent_bytes') or 0)} of {format_mib(total)}" if total else "—"
        rows.append([code(w.get("node_id")), str(w.get("block_range", "—")), escape_md(title.split(", ", 1)[-1]), sent])
    return table(["Node", "Blocks", "State", "Sent"], rows)


def _outcome(status: dict) -> Optional[str]:
    """``"ready"``, ``"failed"`` (a worker's transfer failed) or None (still going)."""
    if status.get("ready"):
        return "ready"
    if any(w.get("state") == "failed" for w in status.get("workers") or []):
        return "failed"
    return None


async def _blocks(ctx: CommandContext, rest: list[str]) -> str:
    if len(rest) > 1:
        raise CommandUsageError("Usage: /workers blocks [network].")
    nid = await choose_network(ctx, rest[0] if rest else None)
    status = await daemon_call(ctx, "distribution_status", network_id=nid)
    if status.get("epoch") is None:
        return f"Network {code(nid)} has no placement yet; see `/workers plan`, then `/workers rebalance`."
    how = {
        "ready": "ready: every member has loaded its blocks",
        "failed": "not ready: sending the blocks failed",
    }.get(_outcome(status) or "", "not ready yet: blocks are still being sent or loaded")
    return "\n".join([f"Network {code(nid)}, placement epoch {status['epoch']}, is {how}.", "", blocks_table(status)])


async def _network_name(ctx: CommandContext, nid: str) -> str:
    networks = (await daemon_call(ctx, "network_list")).get("networks") or []
    net = next((n for n in networks if n.get("network_id") == nid), None)
    return str(net.get("name") or nid) if net else nid


async def _rebalance(ctx: CommandContext, rest: list[str]) -> str:
    if len(rest) > 1:
        raise CommandUsageError("Usage: /workers rebalance [network].")
    nid = await choose_network(ctx, rest[0] if rest else None)
    applied = await daemon_call(ctx, "placement_apply", network_id=nid)
    epoch = applied.get("epoch")
    make_board = ctx.services.get("task_board")
    board = make_board() if make_board is not None else None
    deadline = ctx.clock() + REBALANCE_WAIT_S
    while True:
        status = await daemon_call(ctx, "distribution_status", network_id=nid)
        outcome = _outcome(status)
        tasks = [transfer_task(w) for w in status.get("workers") or []]
        line = {"ready": "Ready", "failed": "Failed"}.get(outcome or "", f"Sending the blocks of epoch {epoch}…")
        if board is not None:
            await board.show(line, tasks)
        elif ctx.progress is not None:
            await ctx.progress(f"{line} " + "; ".join(title for title, _ in tasks))
        if outcome is not None or ctx.clock() >= deadline:
            break
        await asyncio.sleep(POLL_S)
    grid = blocks_table(status)
    if outcome == "ready":
        name = await _network_name(ctx, nid)
        use = "The chat uses it already." if network_in_use(ctx) == nid else f"Select it for the chat with `/network use {nid}`."
        n = len(status.get("workers") or [])
        return "\n".join([
            f"Network **{escape_md(name)}** ({code(nid)}) is ready: placement epoch {epoch} is loaded on "
            f"{n} node{'s' if n != 1 else ''}. {use}",
            "", grid,
        ])
    if outcome == "failed":
        why = "; ".join(
            f"{code(w.get('node_id'))}: {escape_md(' '.join(str(w.get('message') or 'no reason given').split()))}"
            for w in status.get("workers") or [] if w.get("state") == "failed"
        )
        return "\n".join([
            f"Sending the blocks of network {code(nid)} failed ({why}). Check the members with `/workers list`, "
            "then send `/workers rebalance` again.",
            "", grid,
        ])
    minutes = round(REBALANCE_WAIT_S / 60)
    return "\n".join([
        f"Network {code(nid)} is not ready after {minutes} minute{'s' if minutes != 1 else ''}; the transfers go on "
        "in the background: follow them with `/workers blocks`.",
        "", grid,
    ])


_SUBCOMMANDS = {
    "list": _list,
    "approve": _approve,
    "reject": _reject,
    "allocate": _allocate,
    "remove": _remove,
    "plan": _plan,
    "rebalance": _rebalance,
    "blocks": _blocks,
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
    return await dispatch(ctx, "workers", words, _SUBCOMMANDS)


COMMAND = Command(
    name="workers",
    usage="/workers list|approve|reject|allocate|remove|plan|rebalance|blocks …",
    description="Admins: a network's machines, their resources and allocations, and which blocks of the model each runs (/workers shows how).",
    icon="server",
    run=run,
)
