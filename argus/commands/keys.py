"""``/keys`` — the API-key pool, for administrators: add, list, enable, disable, remove, usage.

``/keys add <provider> <key>`` carries a secret: the command declares it
(``conceals``), so the chat handler removes the message from the chat before
anything else happens, and commands are never stored. The reply names the key
by its fingerprint only; nothing here ever echoes a key.
"""
from __future__ import annotations

from collections import defaultdict

from argus.commands.base import ADMIN_ONLY, Command, CommandContext, CommandUsageError, escape_md
from argus.keys.pool import KeyPool, KeyPoolError, quota_day, utc_day
from argus.store.base import ApiKeyRecord, KeyExists, NotFound
from worker.protocol.units import format_duration

#: Days ``/keys usage`` covers unless told otherwise, and at most.
USAGE_DAYS = 7
MAX_USAGE_DAYS = 90
#: Rows of the usage table shown, at most (the newest days first).
MAX_USAGE_ROWS = 60

USAGE = (
    "Usage: `/keys list`, `/keys add <provider> <key>`, `/keys enable|disable|remove <fingerprint>`, "
    "`/keys usage [days]`."
)
NOT_CONFIGURED = "The API-key pool is not available on this server."
#: Subcommands whose message holds no secret (every other /keys message is removed from the chat).
_PLAIN = ("", "list", "usage", "help")


def conceals(args: str) -> bool:
    """Whether a ``/keys`` message may hold a key: anything but the plain listings (a typo
    such as ``/keys ad gemini AIza…`` is removed too)."""
    words = args.split()
    return (words[0].lower() if words else "") not in _PLAIN


def _today(pool: KeyPool, rec: ApiKeyRecord, now: float) -> tuple[int, int]:
    """(requests, tokens) of ``rec`` on its provider's current quota day, over all models."""
    zone = next((m.day_resets for m in pool.catalogue.models if m.provider == rec.provider), "UTC")
    day = quota_day(now, zone)
    ws = [w for w in rec.windows.values() if w.day == day]
    return sum(w.day_requests for w in ws), sum(w.day_tokens for w in ws)


def _state(pool: KeyPool, rec: ApiKeyRecord, now: float) -> str:
    state = rec.state
    if rec.state == "enabled" and rec.cooldown_until > now:
        state = f"cooling down ({format_duration(rec.cooldown_until - now)})"
    if rec.source == "env" and not pool.in_environment(rec.id):
        state += ", not in this server's environment"
    return state


async def _list(ctx: CommandContext, pool: KeyPool) -> str:
    keys = await ctx.call(pool.list)
    if not keys:
        return (
            "There are no API keys yet. Add one with `/keys add <provider> <key>` "
            f"(providers: {', '.join(pool.providers)}), or set GEMINI_API_KEYS and restart."
        )
    now = ctx.clock()
    lines = [
        "**API keys**",
        "",
        "| key | provider | from | state | today: requests / tokens | total: requests / tokens | last error |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k in keys:
        req, tok = _today(pool, k, now)
        lines.append(
            f"| `{k.fingerprint}` | {k.provider} | {'environment' if k.source == 'env' else 'app'} | "
            f"{_state(pool, k, now)} | {req:,} / {tok:,} | {k.requests_total:,} / {k.tokens_total:,} | "
            f"{k.last_error or '—'} |"
        )
    lines += ["", "Refer to a key by its fingerprint (or `provider:fingerprint`). `/keys usage` shows tokens per day."]
    return "\n".join(lines)


async def _add(ctx: CommandContext, pool: KeyPool, rest: list[str]) -> str:
    note = "Your message was removed from the chat and was not saved."
    if len(rest) != 2:
        return f"Usage: `/keys add <provider> <key>` (providers: {', '.join(pool.providers)}). {note}"
    provider, key = rest
    try:
        rec = await ctx.call(pool.add, provider, key)
    except KeyExists:
        return f"That key is already in the pool. {note}"
    except KeyPoolError as exc:
        return f"{exc} {note}"
    return f"Added a {rec.provider} key: `{rec.fingerprint}` (encrypted at rest). {note}"


async def _change(ctx: CommandContext, pool: KeyPool, action: str, rest: list[str]) -> str:
    if len(rest) != 1:
        raise CommandUsageError(f"Usage: /keys {action} <fingerprint>, as /keys list shows it.")
    try:
        rec = await ctx.call(pool.find, rest[0])
        if action == "remove":
            done = await ctx.call(pool.remove, rec.id)
            if done.source == "env":
                return (
                    f"The {rec.provider} key `{rec.fingerprint}` comes from the server's environment, so it was "
                    "disabled instead; remove it from the environment variable and restart to delete it."
                )
            return f"Removed the {rec.provider} key `{rec.fingerprint}` (its usage history is kept)."
        done = await ctx.call(pool.set_state, rec.id, "enabled" if action == "enable" else "disabled")
    except KeyPoolError as exc:
        return str(exc)
    except NotFound:
        return "That key was removed meanwhile."
    return f"The {done.provider} key `{done.fingerprint}` is now {done.state}."


async def _usage(ctx: CommandContext, pool: KeyPool, rest: list[str]) -> str:
    if len(rest) > 1 or (rest and not rest[0].isdigit()):
        raise CommandUsageError("Usage: /keys usage [days].")
    days = min(MAX_USAGE_DAYS, max(1, int(rest[0]))) if rest else USAGE_DAYS
    now = ctx.clock()
    since = utc_day(now - (days - 1) * 86400)
    rows = await ctx.call(pool.store.list_api_usage, since_day=since)
    if not rows:
        return f"No API usage recorded in the last {days} day{'s' if days != 1 else ''}."
    names = {k.id: f"{k.provider}:{k.fingerprint}" for k in await ctx.call(pool.list)}
    per_key_day: dict = defaultdict(lambda: [0, 0, 0])
    per_user: dict = defaultdict(lambda: [0, 0])
    per_model: dict = defaultdict(lambda: [0, 0])
    for u in rows:
        acc = per_key_day[(u.day, u.key_id)]
        acc[0] += u.requests
        acc[1] += u.input_tokens
        acc[2] += u.output_tokens
        per_user[u.user_id][0] += u.requests
        per_user[u.user_id][1] += u.input_tokens + u.output_tokens
        per_model[u.model][0] += u.requests
        per_model[u.model][1] += u.input_tokens + u.output_tokens
    lines = [
        f"**API usage, last {days} day{'s' if days != 1 else ''}** (UTC days)",
        "",
        "| day | key | requests | input tokens | output tokens |",
        "| --- | --- | --- | --- | --- |",
    ]
    ordered = sorted(per_key_day.items(), key=lambda kv: (kv[0][0], names.get(kv[0][1], "")), reverse=True)
    for (day, key_id), (req, tin, tout) in ordered[:MAX_USAGE_ROWS]:
        lines.append(f"| {day} | `{names.get(key_id) or (key_id if key_id.startswith('cluster:') else 'removed key')}` | {req:,} | {tin:,} | {tout:,} |")
    if len(ordered) > MAX_USAGE_ROWS:
        lines.append(f"| … | {len(ordered) - MAX_USAGE_ROWS} older rows | | | |")
    lines += ["", "**By user**", ""]
    for user_id, (req, tok) in sorted(per_user.items(), key=lambda kv: -kv[1][1]):
        user = await ctx.call(ctx.store.get_user, user_id)
        who = escape_md(user.email) if user is not None else "(deleted user)"
        lines.append(f"- {who}: {req:,} requests, {tok:,} tokens")
    lines += ["", "**By model**", ""]
    for model, (req, tok) in sorted(per_model.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"- `{model}`: {req:,} requests, {tok:,} tokens")
    return "\n".join(lines)


async def run(ctx: CommandContext, args: str) -> str:
    """Manage the API-key pool (administrators only).

    Raises:
        CommandUsageError: unknown subcommand or wrong arguments.
    """
    if not ctx.is_admin:
        return ADMIN_ONLY
    pool = ctx.services.get("keys")
    if not isinstance(pool, KeyPool):
        return NOT_CONFIGURED
    words = args.split()
    sub = words[0].lower() if words else "list"
    rest = words[1:]
    if sub == "list":
        return await _list(ctx, pool)
    if sub == "add":
        return await _add(ctx, pool, rest)
    if sub in ("enable", "disable", "remove"):
        return await _change(ctx, pool, sub, rest)
    if sub == "usage":
        return await _usage(ctx, pool, rest)
    if sub == "help":
        return USAGE
    return f"{USAGE} (Your message was removed from the chat.)"


COMMAND = Command(
    name="keys",
    usage="/keys [list|add|enable|disable|remove|usage]",
    description="Administrators: the API keys of Gemini, OpenAI and Claude, their state and token usage.",
    icon="key-round",
    run=run,
    conceals=conceals,
)
