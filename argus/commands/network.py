"""``/network …`` — the worker networks of this machine's daemon (admins only).

Every subcommand is one call to the local worker daemon's control endpoint
(``ctx.services["daemon"]``, a :class:`worker.control.ControlClient`) and a
Markdown reply. The network the chat uses is kept server-wide by
``ctx.services["network_choice"]`` (:class:`argus.network_choice.NetworkChoice`).

``/network sessions`` lists the sessions (KV caches) the workers keep for the chat's
conversations, named by the conversation's title when it is the admin's own, and drops one.

This module also holds what ``/workers`` shares with it: the daemon call that
turns the daemon's errors into one sentence (:func:`daemon_call`), choosing the
network when none is named (:func:`choose_network`), id checks and the
formatting of sizes, shares and ages.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Optional, Sequence

from argus.commands.base import ADMIN_ONLY, Command, CommandContext, CommandUsageError, escape_md, format_time
from argus.store.base import NotFound
from worker.control import ControlError, DaemonUnavailable
from worker.protocol import ID_PATTERN, ID_RULE
from worker.protocol.units import format_ago, format_duration, format_mib

#: The reply when the server has no daemon client (tests, or a server built without one).
NOT_CONFIGURED = "The worker network is not set up on this server, so there is no worker daemon to ask."
#: Seconds a join token lives when no ttl is given, and the allowed range.
DEFAULT_TOKEN_TTL_S = 900
MIN_TOKEN_TTL_S, MAX_TOKEN_TTL_S = 60, 7 * 86400
#: Longest join token accepted (the protocol's limit; real ones are about 300 characters).
MAX_TOKEN_CHARS = 2048

#: What each network state means, for /network list and status.
STATE_TEXT = {
    "serving": "serving (admin)",
    "connected": "connected",
    "connecting": "connecting…",
    "pending": "waiting for approval",
}

SUBCOMMANDS = """\
**/network** — the worker networks of this machine (admins only):

- `/network list` — the networks this machine is in
- `/network create <name> [--auto-approve]` — a new network with this machine as its admin
- `/network token [network] [ttl]` — a one-time join token for another machine (ttl like 900, 15m, 2h, 1d; default 15 minutes)
- `/network join <token>` — join a network with a token from its admin
- `/network discover` — networks answering on the local network
- `/network status [network]` — one network in detail, with who has which config version
- `/network use <network>` — the network the chat uses from now on (for everyone on this server): its model, split over its workers, answers new messages
- `/network sessions [network]` — the conversations the workers keep a session (KV cache) for, with size, tokens and age
- `/network sessions drop <session>` — forget one of them on every node (the conversation itself stays)
- `/network autoapprove [network] on|off` — let machines with a valid token join without `/workers approve`
- `/network leave <network>` — leave a network

Spread the model over the workers with `/workers plan` and `/workers rebalance`."""


class NetworkReply(Exception):
    """Ends a network command early; ``str(e)`` is the whole reply (one sentence):
    no daemon, the daemon refused, or no network fits."""


# ---------------------------------------------------------------------------
# Shared with /workers
# ---------------------------------------------------------------------------
async def daemon_call(ctx: CommandContext, command: str, **args: Any) -> dict:
    """``await ctx.services["daemon"].call(command, **args)``.

    Raises:
        NetworkReply: no daemon client, no daemon running or answering (its sentence
            saying how to start one), or a refusal (the daemon's message).
    """
    client = ctx.services.get("daemon")
    if client is None:
        raise NetworkReply(NOT_CONFIGURED)
    try:
        return await client.call(command, **args)
    except DaemonUnavailable as e:
        raise NetworkReply(str(e)) from None
    except ControlError as e:
        raise NetworkReply(as_sentence(e.message or str(e) or f"The worker daemon refused ({e.code}).")) from None


def as_sentence(text: str) -> str:
    """``text`` ending with a full stop (the daemon's messages may lack one; the first
    letter stays as it is, since it may begin a case-sensitive id)."""
    text = text.strip()
    return text if not text or text[-1] in ".!?)" else text + "."


def check_id(text: str, what: str) -> str:
    """``text`` (backticks around it dropped) if it is a valid id.

    Raises:
        CommandUsageError: naming ``what`` ("network", "node") and the rule.
    """
    value = text.strip().strip("`")
    if not ID_PATTERN.fullmatch(value):
        shown = value if len(value) <= 40 else value[:39] + "…"
        raise CommandUsageError(f"`{shown.replace('`', '')}` is not a {what} id ({ID_RULE}).")
    return value


def network_in_use(ctx: CommandContext) -> Optional[str]:
    """The id chosen with ``/network use``, or None."""
    choice = ctx.services.get("network_choice")
    return choice.current_network() if choice is not None else None


def pick_network(networks: Sequence[dict], in_use: Optional[str]) -> Optional[str]:
    """The network meant when none is named: the one in use (if this machine is still
    in it), else the only one; None when there are several and none is in use.

    Raises:
        NetworkReply: this machine is in no network.
    """
    ids = [n["network_id"] for n in networks]
    if not ids:
        raise NetworkReply(
            "This machine is in no network yet; create one with `/network create <name>` "
            "or join one with `/network join <token>`."
        )
    if in_use in ids:
        return in_use
    return ids[0] if len(ids) == 1 else None


async def choose_network(ctx: CommandContext, given: Optional[str]) -> str:
    """The network a command is about: ``given`` (checked), else :func:`pick_network`'s.

    Raises:
        CommandUsageError: ``given`` is not a valid id.
        NetworkReply: no network, or several and none in use (the reply lists them).
    """
    if given:
        return check_id(given, "network")
    networks = (await daemon_call(ctx, "network_list"))["networks"]
    picked = pick_network(networks, network_in_use(ctx))
    if picked is None:
        names = ", ".join(f"`{n['network_id']}`" for n in networks)
        raise NetworkReply(
            f"This machine is in several networks ({names}); name one, or choose the chat's "
            "with `/network use <network>`."
        )
    return picked


def code(text: Any) -> str:
    """``text`` as inline code (backticks inside are dropped; empty → a dash)."""
    value = str(text).replace("`", "").replace("\n", " ").strip() if text is not None else ""
    return f"`{value}`" if value else "—"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table; cells are already formatted (escaped where needed)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(c.replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def on_off(flag: Any) -> str:
    return "on" if flag else "off"


# ---------------------------------------------------------------------------
# The subcommands
# ---------------------------------------------------------------------------
def _network_rows(networks: Sequence[dict], in_use: Optional[str]) -> list[list[str]]:
    rows = []
    for n in networks:
        name = escape_md(str(n.get("name", ""))) or "—"
        if n["network_id"] == in_use:
            name += " ← in use"
        rows.append([
            name, code(n["network_id"]), str(n.get("role", "—")),
            STATE_TEXT.get(n.get("state"), str(n.get("state", "—"))),
            str(n.get("members", "—")), code(n.get("model_id")), code(n.get("admin_address")),
            on_off(n.get("auto_approve")), f"v{n.get('config_version', '?')}",
        ])
    return rows


def _network_listing(node_id: str, networks: Sequence[dict], in_use: Optional[str]) -> str:
    head = f"This machine is node {code(node_id)}."
    if not networks:
        return (
            f"{head} It is in no network yet; create one with `/network create <name>` "
            "or join one with `/network join <token>`."
        )
    headers = ["Network", "Id", "Role", "State", "Members", "Model", "Admin address", "Auto-approve", "Config"]
    return "\n".join([head, "", table(headers, _network_rows(networks, in_use))])


async def _list(ctx: CommandContext, rest: list[str]) -> str:
    if rest:
        raise CommandUsageError("Usage: /network list (no arguments).")
    listing = await daemon_call(ctx, "network_list")
    return _network_listing(listing.get("node_id", ""), listing["networks"], network_in_use(ctx))


async def _create(ctx: CommandContext, rest: list[str]) -> str:
    flags = [w for w in rest if w.startswith("--")]
    auto = False
    for flag in flags:
        if flag.lower() not in ("--auto-approve", "--autoapprove"):
            raise CommandUsageError(f"Unknown option `{flag.replace('`', '')}`; the only one is --auto-approve.")
        auto = True
    name = " ".join(w for w in rest if not w.startswith("--")).strip().strip("\"'")
    if not name:
        raise CommandUsageError("Usage: /network create <name> [--auto-approve].")
    if len(name) > 64 or not name.isprintable():
        raise CommandUsageError("A network name is at most 64 printable characters.")
    net = (await daemon_call(ctx, "network_create", name=name, auto_approve=auto))["network"]
    nid = net["network_id"]
    return (
        f"Created network **{escape_md(str(net.get('name', name)))}** ({code(nid)}) for model "
        f"{code(net.get('model_id'))} ({net.get('block_count', '?')} blocks). This machine is its admin, "
        f"serving on port {net.get('port', '?')} (admin address {code(net.get('admin_address'))}); "
        f"auto-approve is {on_off(net.get('auto_approve'))}. "
        f"Invite another machine with `/network token {nid}`."
    )


async def _discover(ctx: CommandContext, rest: list[str]) -> str:
    if rest:
        raise CommandUsageError("Usage: /network discover (no arguments).")
    found = (await daemon_call(ctx, "network_discover"))["found"]
    if not found:
        return "No network answered on the local network; ask its admin for its address, or for a join token."
    rows = []
    for f in found:
        fp = str(f.get("ca_fingerprint") or "")
        rows.append([
            escape_md(str(f.get("name", ""))) or "—", code(f.get("network_id")), code(f.get("model_id")),
            code(f.get("admin_address")), code(f.get("node_id")), code(fp[:16] + "…" if len(fp) > 16 else fp),
        ])
    headers = ["Network", "Id", "Model", "Admin address", "Admin node", "CA fingerprint"]
    return "\n".join([
        table(headers, rows),
        "",
        "To join one, ask its admin for a token (`/network token` in their chat) and send `/network join <token>`.",
    ])


async def _join(ctx: CommandContext, rest: list[str]) -> str:
    if len(rest) != 1 or not rest[0].strip("`"):
        raise CommandUsageError("Usage: /network join <token>, with a token from the network's admin.")
    token = rest[0].strip("`")
    if len(token) > MAX_TOKEN_CHARS:
        raise CommandUsageError("That is not a join token (it is far too long).")
    result = await daemon_call(ctx, "network_join", token=token)
    nid, state = result.get("network_id"), result.get("state")
    message = str(result.get("message") or "").strip()
    if state == "joined":
        head = f"This machine joined network {code(nid)}."
    else:
        head = f"This machine asked to join network {code(nid)}; it waits for the admin's approval."
    return f"{head} {message}".strip() if message and message not in head else head


async def _leave(ctx: CommandContext, rest: list[str]) -> str:
    if len(rest) != 1:
        raise CommandUsageError("Usage: /network leave <network>, with an id from /network list.")
    nid = check_id(rest[0], "network")
    left = (await daemon_call(ctx, "network_leave", network_id=nid)).get("network_id", nid)
    reply = f"This machine left network {code(left)}."
    choice = ctx.services.get("network_choice")
    if choice is not None and choice.current_network() == left:
        await ctx.call(choice.use, None)
        reply += " The chat used it; choose another with `/network use <network>`."
    return reply


def _status_text(status: dict) -> str:
    net, versions = status["network"], status.get("versions") or {}
    current = net.get("config_version")
    rows = [
        ["Name", escape_md(str(net.get("name", ""))) or "—"],
        ["Id", code(net["network_id"])],
        ["Model", f"{code(net.get('model_id'))} ({net.get('block_count', '?')} blocks)"],
        ["This machine's role", str(net.get("role", "—"))],
        ["State", STATE_TEXT.get(net.get("state"), str(net.get("state", "—")))],
        ["Port", str(net.get("port", "—"))],
        ["Admin address", code(net.get("admin_address"))],
        ["Members", str(net.get("members", "—"))],
        ["Auto-approve", on_off(net.get("auto_approve"))],
        ["Config version", f"v{current}"],
    ]
    parts = [table(["Network", ""], rows)]
    if versions:
        vrows = []
        for node, acked in sorted(versions.items()):
            if acked is None:
                note = "not acknowledged yet"
            elif current is None or acked >= current:
                note = "up to date"
            else:
                note = f"behind by {current - acked}"
            vrows.append([code(node), "—" if acked is None else f"v{acked}", note])
        parts += ["", "Config versions acknowledged:", "", table(["Node", "Version", ""], vrows)]
    return "\n".join(parts)


async def _status(ctx: CommandContext, rest: list[str]) -> str:
    if len(rest) > 1:
        raise CommandUsageError("Usage: /network status [network].")
    if rest:
        nid = check_id(rest[0], "network")
    else:
        listing = await daemon_call(ctx, "network_list")
        in_use = network_in_use(ctx)
        picked = pick_network(listing["networks"], in_use)
        if picked is None:
            return "\n".join([
                _network_listing(listing.get("node_id", ""), listing["networks"], in_use),
                "",
                "Name one with `/network status <network>`, or choose the chat's with `/network use <network>`.",
            ])
        nid = picked
    return _status_text(await daemon_call(ctx, "network_status", network_id=nid))


async def _use(ctx: CommandContext, rest: list[str]) -> str:
    if len(rest) > 1:
        raise CommandUsageError("Usage: /network use <network>, with an id from /network list.")
    choice = ctx.services.get("network_choice")
    if choice is None:
        raise NetworkReply(NOT_CONFIGURED)
    if not rest:
        current = choice.current_network()
        if current is None:
            return "The chat uses no particular network; choose one with `/network use <network>`."
        return f"The chat uses network {code(current)}."
    nid = check_id(rest[0], "network")
    networks = (await daemon_call(ctx, "network_list"))["networks"]
    net = next((n for n in networks if n["network_id"] == nid), None)
    if net is None:
        known = ", ".join(code(n["network_id"]) for n in networks) or "none"
        return f"This machine is not in a network {code(nid)} (its networks: {known})."
    await ctx.call(choice.use, nid)
    head = f"The chat now uses network **{escape_md(str(net.get('name', '')))}** ({code(nid)}), for everyone on this server"
    if net.get("role") != "admin":
        return (
            f"{head}, for the commands. This machine is a {net.get('role', 'member')} of it, not its admin, so the "
            "network does not answer chat messages here: only its admin's chat can have it answer."
        )
    reply = f"{head}: its model answers new messages (unless someone picks another one with `/model`)."
    try:
        ready = (await daemon_call(ctx, "distribution_status", network_id=nid)).get("ready")
    except NetworkReply:
        ready = True  # the answer itself will say what is wrong
    if not ready:
        reply += (
            " Its blocks are not all loaded on its workers yet (`/workers blocks`; `/workers rebalance` sends them); "
            "until they are, the local model answers."
        )
    return reply


async def conversation_title(ctx: CommandContext, session_id: str) -> Optional[str]:
    """The title of the conversation a chat session id names (``<network>.<conversation id>``,
    see ``worker.control.session_id_for``) when it is one of this user's, else None."""
    _, dot, key = session_id.partition(".")
    if not dot or not key:
        return None
    try:
        conv = await ctx.call(ctx.store.get_conversation, key, ctx.user_id)
    except NotFound:
        return None
    return conv.title


def _saved_cell(s: dict, now: float) -> str:
    saved = format_ago(s.get("saved_at"), now) if s.get("saved_at") is not None else "not yet"
    return f"{saved}, in memory" if s.get("in_memory") else saved


async def sessions_text(ctx: CommandContext, nid: str, sessions: Sequence[dict]) -> str:
    """``/network sessions``'s reply for a ``sessions_list`` result: newest first."""
    if not sessions:
        return (
            f"No conversation has a session on network {code(nid)} yet; one starts with the first message "
            "answered by the network (`/network use`)."
        )
    now = ctx.clock()
    ordered = sorted(sessions, key=lambda s: (not s.get("in_memory"), -(s.get("saved_at") or 0.0)))
    rows = []
    for s in ordered:
        sid = str(s.get("session_id", ""))
        title = await conversation_title(ctx, sid)
        nodes = ", ".join(code(n) for n in s.get("nodes") or []) or "—"
        rows.append([
            escape_md(title) if title else code(sid), code(sid), format_mib(s.get("bytes")),
            f"{int(s.get('n_tokens') or 0):,}", _saved_cell(s, now), nodes,
        ])
    headers = ["Conversation", "Session", "Size", "Tokens", "Saved", "Nodes"]
    total = sum(int(s.get("bytes") or 0) for s in sessions)
    return "\n".join([
        f"Sessions kept by the workers of network {code(nid)}: {len(sessions)}, {format_mib(total)} in all.",
        "",
        table(headers, rows),
        "",
        "A continued conversation reuses its session, so only its new tokens are computed. "
        "Forget one on every node with `/network sessions drop <session>`.",
    ])


async def _sessions(ctx: CommandContext, rest: list[str]) -> str:
    if rest and rest[0].lower() == "drop":
        return await _session_drop(ctx, rest[1:])
    if len(rest) > 1:
        raise CommandUsageError("Usage: /network sessions [network], or /network sessions drop <session>.")
    nid = await choose_network(ctx, rest[0] if rest else None)
    listing = await daemon_call(ctx, "sessions_list", network_id=nid)
    return await sessions_text(ctx, nid, listing.get("sessions") or [])


async def _session_drop(ctx: CommandContext, rest: list[str]) -> str:
    if not 1 <= len(rest) <= 2:
        raise CommandUsageError("Usage: /network sessions drop <session> [network], with a session from /network sessions.")
    sid = check_id(rest[0], "session")
    given = rest[1] if len(rest) == 2 else None
    prefix = sid.partition(".")[0] if "." in sid else None
    nid = await choose_network(ctx, given or prefix)
    dropped = int((await daemon_call(ctx, "session_drop", network_id=nid, session_id=sid)).get("dropped") or 0)
    if not dropped:
        return f"No node of network {code(nid)} has session {code(sid)}; `/network sessions` lists the ones they keep."
    return (
        f"Dropped session {code(sid)} on {dropped} node{'s' if dropped != 1 else ''} of network {code(nid)}. "
        "Its conversation stays; its next answer computes the whole conversation again."
    )


_TTL = re.compile(r"(\d{1,6})\s*(s|sec|m|min|h|d)?", re.I)


def parse_ttl(text: str) -> Optional[int]:
    """``"900"``, ``"90s"``, ``"15m"``, ``"2h"``, ``"1d"`` → seconds; None if ``text`` is not a duration."""
    m = _TTL.fullmatch(text.strip())
    if m is None:
        return None
    unit = (m.group(2) or "s").lower()[0]
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


async def _token(ctx: CommandContext, rest: list[str]) -> str:
    if len(rest) > 2:
        raise CommandUsageError("Usage: /network token [network] [ttl], e.g. /network token 15m.")
    given, ttl = None, None
    if len(rest) == 2:
        given, ttl = rest[0], parse_ttl(rest[1])
        if ttl is None:
            raise CommandUsageError(f"The token's lifetime must be a duration like 900, 15m, 2h or 1d, not `{rest[1][:20]}`.")
    elif len(rest) == 1:
        ttl = parse_ttl(rest[0])
        if ttl is None:
            given = rest[0]
    if ttl is not None and not MIN_TOKEN_TTL_S <= ttl <= MAX_TOKEN_TTL_S:
        raise CommandUsageError("A token's lifetime must be from 1 minute to 7 days.")
    nid = await choose_network(ctx, given)
    result = await daemon_call(ctx, "token_issue", network_id=nid, ttl_s=ttl or DEFAULT_TOKEN_TTL_S)
    token = str(result["token"])
    expires = float(result["expires_at"])
    head = (
        f"Join token for network {code(result.get('network_id', nid))}, for one machine, valid until "
        f"{format_time(expires)} (in {format_duration(expires - ctx.clock())}):"
    )
    how = (
        "On the machine that should join, run `python -m worker join <token>` (with `--data-dir` if its "
        "daemon uses another data directory than `data/worker`), or send `/network join <token>` in that "
        "machine's chat as an admin. Keep the token private: "
        "until it is used or expires, it lets a machine ask to join."
    )
    return "\n".join([head, "", "```", token, "```", "", how])


_ON = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


async def _autoapprove(ctx: CommandContext, rest: list[str]) -> str:
    if not 1 <= len(rest) <= 2 or rest[-1].lower() not in _ON:
        raise CommandUsageError("Usage: /network autoapprove [network] on|off.")
    flag = _ON[rest[-1].lower()]
    nid = await choose_network(ctx, rest[0] if len(rest) == 2 else None)
    net = (await daemon_call(ctx, "network_set", network_id=nid, auto_approve=flag))["network"]
    name = f"**{escape_md(str(net.get('name', '')))}** ({code(nid)})"
    if net.get("auto_approve", flag):
        return f"Auto-approve is on for {name}: a machine with a valid token joins without `/workers approve`."
    return f"Auto-approve is off for {name}: each machine that asks to join waits for `/workers approve <node>`."


_SUBCOMMANDS = {
    "list": _list,
    "create": _create,
    "discover": _discover,
    "join": _join,
    "leave": _leave,
    "status": _status,
    "use": _use,
    "sessions": _sessions,
    "token": _token,
    "autoapprove": _autoapprove,
    "auto-approve": _autoapprove,
}


async def run(ctx: CommandContext, args: str) -> str:
    """``/network <subcommand> …`` (see :data:`SUBCOMMANDS`); admins only.

    Raises:
        CommandUsageError: an unknown subcommand or bad arguments.
    """
    if not ctx.is_admin:
        return ADMIN_ONLY
    words = args.split()
    if not words:
        return SUBCOMMANDS
    return await dispatch(ctx, "network", words, _SUBCOMMANDS)


async def dispatch(ctx: CommandContext, command: str, words: Sequence[str], table: dict) -> str:
    """Run subcommand ``words[0]`` of ``/command`` from ``table`` with the remaining words;
    a NetworkReply becomes the answer. Raises CommandUsageError for an unknown subcommand."""
    handler = table.get(words[0].lower())
    if handler is None:
        raise CommandUsageError(f"`/{command} {words[0][:20].replace('`', '')}` is not a subcommand; "
                                f"send /{command} to see them.")
    try:
        return await handler(ctx, list(words[1:]))
    except NetworkReply as e:
        return str(e)


COMMAND = Command(
    name="network",
    usage="/network create|list|discover|join|leave|status|use|sessions|token|autoapprove …",
    description="Admins: create, join and manage this machine's worker networks and their sessions (/network shows how).",
    icon="network",
    run=run,
)
