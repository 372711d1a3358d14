"""Slash commands: parsing, the registry, and each command against a real SQLiteStore."""
from __future__ import annotations

import json
import re

import pytest

from argus.commands import (
    COMMANDS,
    CommandContext,
    ModelInfo,
    ParsedCommand,
    SessionState,
    menu,
    parse_command,
    run_command,
)
from argus.commands.convs import MAX_PAGE
from argus.commands.delete import CONFIRM_FIRST, CONFIRM_WINDOW_S
from argus.commands.select import NOT_FOUND
from argus.store import NotFound

LOCAL = ModelInfo(id="smollm2-135m-test", name="SmolLM2 135M (local)")


def ctx_for(store, user, state=None, models=(LOCAL,), page_size=10) -> CommandContext:
    return CommandContext(store=store, user_id=user.id, state=state or SessionState(), models=list(models), page_size=page_size)


async def run(ctx: CommandContext, text: str, command: str | None = None) -> str:
    parsed = parse_command(text, command)
    assert parsed is not None, f"{text!r} was not parsed as a command"
    return await run_command(ctx, parsed)


# ---- parsing -------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, command, expected",
    [
        ("/help", None, ParsedCommand("help", "")),
        ("  /convs 2  ", None, ParsedCommand("convs", "2")),
        ("/CONVS\t3", None, ParsedCommand("convs", "3")),
        ("/select abc\n", None, ParsedCommand("select", "abc")),
        ("/model  smol  x", None, ParsedCommand("model", "smol  x")),
        ("/", None, ParsedCommand("", "")),
        ("/nope", None, ParsedCommand("nope", "")),
        # chosen from Chainlit's command menu: message.command holds the name,
        # the text holds only the arguments
        ("2", "convs", ParsedCommand("convs", "2")),
        ("", "new", ParsedCommand("new", "")),
        ("/convs 2", "convs", ParsedCommand("convs", "2")),
        # ordinary messages
        ("hello /help", None, None),
        ("what is 1/2?", None, None),
        ("/usr/bin is a folder", None, None),
        ("", None, None),
        (None, None, None),
    ],
)
def test_parse_command(text, command, expected):
    assert parse_command(text, command) == expected


def test_registry_and_menu():
    assert list(COMMANDS) == [
        "help", "new", "convs", "select", "search", "rename", "export", "delete", "model", "network", "workers",
        "image", "video", "keys",
    ]
    items = menu()
    assert [i["id"] for i in items] == list(COMMANDS)
    for item in items:  # the shape chainlit.types.CommandDict expects
        assert set(item) >= {"id", "icon", "description"}
        assert item["description"] and item["icon"]


# ---- /help and unknown -----------------------------------------------------------
async def test_help_lists_every_command(store, alice):
    reply = await run(ctx_for(store, alice), "/help")
    for cmd in COMMANDS.values():
        assert cmd.usage in reply


async def test_unknown_command_points_to_help(store, alice):
    reply = await run(ctx_for(store, alice), "/frobnicate now")
    assert "/frobnicate" in reply and "/help" in reply
    reply = await run(ctx_for(store, alice), "/")
    assert "/help" in reply


# ---- /new -------------------------------------------------------------------------
async def test_new_resets_the_conversation(store, alice):
    conv = store.create_conversation(alice.id, "old", LOCAL.id)
    state = SessionState(conversation_id=conv.id, thread_id=conv.id)
    reply = await run(ctx_for(store, alice, state), "/new")
    assert state.conversation_id is None
    assert state.thread_id and state.thread_id != conv.id  # the next conversation gets its own thread
    assert "new conversation" in reply.lower()


async def test_new_rejects_arguments(store, alice):
    state = SessionState(conversation_id="keep")
    reply = await run(ctx_for(store, alice, state), "/new please")
    assert "/help" in reply and state.conversation_id == "keep"


# ---- /convs -------------------------------------------------------------------------
async def test_convs_empty(store, alice):
    reply = await run(ctx_for(store, alice), "/convs")
    assert "no conversations" in reply.lower()


async def test_convs_lists_newest_first_with_id_title_time(store, alice, bob):
    a1 = store.create_conversation(alice.id, "First chat", LOCAL.id)
    a2 = store.create_conversation(alice.id, "Second *chat*", LOCAL.id)
    store.add_message(a1.id, alice.id, "user", "bump a1 so it is the most recent")
    b1 = store.create_conversation(bob.id, "Bob's secret", LOCAL.id)
    state = SessionState(conversation_id=a2.id)
    reply = await run(ctx_for(store, alice, state), "/convs")
    assert a1.id in reply and a2.id in reply
    assert b1.id not in reply and "Bob's secret" not in reply
    assert reply.index(a1.id) < reply.index(a2.id)  # a1 was updated last
    assert "First chat" in reply and r"Second \*chat\*" in reply  # markdown escaped
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", reply)
    current_line = next(line for line in reply.splitlines() if a2.id in line)
    assert "current" in current_line


async def test_convs_pages(store, alice):
    convs = [store.create_conversation(alice.id, f"chat {i}", LOCAL.id) for i in range(5)]
    ctx = ctx_for(store, alice, page_size=2)
    p1, p2, p3 = [await run(ctx, f"/convs {n}") for n in (1, 2, 3)]
    def ids(text):  # conversation ids in the order they appear in the reply
        return sorted((c.id for c in convs if c.id in text), key=text.index)

    assert len(ids(p1)) == 2 and len(ids(p2)) == 2 and len(ids(p3)) == 1
    assert set(ids(p1)) | set(ids(p2)) | set(ids(p3)) == {c.id for c in convs}
    assert "/convs 2" in p1 and "/convs 3" in p2 and "/convs 4" not in p3
    assert ids(p1) == [convs[4].id, convs[3].id]  # newest first
    p4 = await run(ctx, "/convs 4")
    assert "no page 4" in p4.lower()


@pytest.mark.parametrize("arg", ["two", "0", "-1", "1.5", "51", "99999"])
async def test_convs_bad_page(store, alice, arg):
    reply = await run(ctx_for(store, alice), f"/convs {arg}")
    assert "/help" in reply and "page" in reply.lower()


async def test_convs_page_cap_is_a_clear_sentence(store, alice):
    assert MAX_PAGE == 50
    reply = await run(ctx_for(store, alice), f"/convs {MAX_PAGE + 1}")
    assert reply.startswith(f"The page must be a whole number from 1 to {MAX_PAGE}.")


class CountingStore:
    """The real store, counting list_conversations calls (how much one /convs costs)."""

    def __init__(self, store):
        self._store, self.calls = store, 0

    def list_conversations(self, *args, **kwargs):
        self.calls += 1
        return self._store.list_conversations(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._store, name)


async def test_convs_late_page_costs_few_store_calls(store, alice):
    convs = [store.create_conversation(alice.id, f"chat {i:03d}", LOCAL.id) for i in range(101)]
    counting = CountingStore(store)
    ctx = CommandContext(store=counting, user_id=alice.id, state=SessionState(), models=[LOCAL], page_size=2)
    reply = await run(ctx, "/convs 50")  # skips 98 conversations
    assert counting.calls <= 3  # was 50: one query per page walked
    newest_first = list(reversed(convs))
    shown = [c.id for c in newest_first if c.id in reply]
    assert shown == [newest_first[98].id, newest_first[99].id]
    assert "/convs 51" not in reply and f"only the first {MAX_PAGE} pages" in reply  # more exist, beyond the cap
    counting.calls = 0
    ctx.page_size = 5
    assert "no page 50" in (await run(ctx, "/convs 50")).lower()  # 245 would be needed
    assert counting.calls <= 3


async def test_convs_from_menu(store, alice):
    store.create_conversation(alice.id, "menu chat", LOCAL.id)
    reply = await run(ctx_for(store, alice), "", command="convs")
    assert "menu chat" in reply


# ---- /select -------------------------------------------------------------------------
async def test_select_switches_and_shows_recent_messages(store, alice):
    conv = store.create_conversation(alice.id, "Trip", LOCAL.id)
    store.add_message(conv.id, alice.id, "user", "Where should I go?")
    store.add_message(conv.id, alice.id, "assistant", "Try the mountains.")
    store.add_message(conv.id, alice.id, "assistant", "partial ans", status="stopped")
    state = SessionState()
    reply = await run(ctx_for(store, alice, state), f"/select {conv.id}")
    assert state.conversation_id == conv.id
    assert state.thread_id == conv.id  # the chat moves to that conversation's thread
    assert f"(/thread/{conv.id})" in reply  # a link to it, as the history sidebar opens it
    assert "Trip" in reply
    assert reply.index("Where should I go?") < reply.index("Try the mountains.")  # oldest first
    assert "**You:**" in reply and "**Assistant:**" in reply
    assert "partial ans _(stopped)_" in reply


async def test_select_marks_a_message_stopped_before_its_answer(store, alice):
    conv = store.create_conversation(alice.id, "Stopped", LOCAL.id)
    store.add_message(conv.id, alice.id, "user", "Tell me a story")
    store.add_message(conv.id, alice.id, "assistant", "", status="stopped")
    store.add_message(conv.id, alice.id, "assistant", "", status="error")
    reply = await run(ctx_for(store, alice), f"/select {conv.id}")
    assert "**Assistant:** _(stopped before answering)_" in reply
    assert "**Assistant:** _(empty)_ _(error)_" in reply


async def test_select_shows_only_the_last_messages(store, alice):
    conv = store.create_conversation(alice.id, "Long", LOCAL.id)
    for i in range(15):
        store.add_message(conv.id, alice.id, "user", f"message number {i:02d}")
    reply = await run(ctx_for(store, alice), f"/select {conv.id}")
    assert "message number 14" in reply and "message number 05" in reply
    assert "message number 04" not in reply


async def test_select_other_users_conversation_is_indistinguishable_from_missing(store, alice, bob):
    theirs = store.create_conversation(bob.id, "Bob's plans", LOCAL.id)
    store.add_message(theirs.id, bob.id, "user", "secret stuff")
    mine = store.create_conversation(alice.id, "mine", LOCAL.id)
    state = SessionState(conversation_id=mine.id)
    foreign = await run(ctx_for(store, alice, state), f"/select {theirs.id}")
    missing = await run(ctx_for(store, alice, state), "/select 0123456789abcdef0123456789abcdef")
    assert foreign == missing == NOT_FOUND == "No conversation with that id."
    assert "secret" not in foreign
    assert state.conversation_id == mine.id  # unchanged
    assert state.thread_id is None


@pytest.mark.parametrize("args", ["", "a b", "x" * 500, "'; DROP TABLE conversations; --"])
async def test_select_bad_arguments(store, alice, args):
    state = SessionState()
    reply = await run(ctx_for(store, alice, state), f"/select {args}")
    assert reply == NOT_FOUND or "/help" in reply
    assert state.conversation_id is None
    assert store.list_conversations(alice.id).items == []  # the store is fine


async def test_select_from_menu(store, alice):
    conv = store.create_conversation(alice.id, "via menu", LOCAL.id)
    state = SessionState()
    await run(ctx_for(store, alice, state), conv.id, command="select")
    assert state.conversation_id == conv.id


# ---- /model ---------------------------------------------------------------------------
async def test_model_shows_current_and_available(store, alice):
    reply = await run(ctx_for(store, alice), "/model")
    assert LOCAL.id in reply and LOCAL.name in reply and "current" in reply.lower()


async def test_model_select_known_and_unknown(store, alice):
    other = ModelInfo(id="other-model", name="Other")
    state = SessionState()
    ctx = ctx_for(store, alice, state, models=(LOCAL, other))
    assert ctx.current_model == LOCAL  # default: the first
    reply = await run(ctx, "/model OTHER-model")
    assert state.model_id == "other-model" and "Other" in reply
    assert ctx.current_model == other
    reply = await run(ctx, "/model gpt-9")
    assert "no model called" in reply.lower() and "gpt-9" in reply
    assert LOCAL.id in reply and other.id in reply  # lists what is available
    assert state.model_id == "other-model"  # unchanged
    reply = await run(ctx, "/model a b")
    assert "/help" in reply


async def test_model_shows_a_load_problem(store, alice):
    broken = ModelInfo(id="local", name="Local model", problem="The model file is missing.")
    reply = await run(ctx_for(store, alice, models=(broken,)), "/model")
    assert "The model file is missing." in reply


async def test_commands_do_not_store_messages(store, alice):
    conv = store.create_conversation(alice.id, "c", LOCAL.id)
    state = SessionState(conversation_id=conv.id)
    ctx = ctx_for(store, alice, state)
    for text in ["/help", "/convs", f"/select {conv.id}", "/search c", "/rename c2", "/export", "/delete", "/model", "/nope"]:
        await run(ctx, text)
    assert store.list_messages(conv.id, alice.id).items == []


async def test_select_waits_while_an_answer_is_being_written(store, alice):
    here = store.create_conversation(alice.id, "here", LOCAL.id)
    there = store.create_conversation(alice.id, "there", LOCAL.id)
    state = SessionState(conversation_id=here.id, thread_id=here.id)
    state.turns.append(object())  # a message of this chat still waits for its answer
    reply = await run(ctx_for(store, alice, state), f"/select {there.id}")
    assert "wait" in reply.lower()
    assert state.conversation_id == here.id and state.thread_id == here.id


# ---- /search ----------------------------------------------------------------------------
async def test_search_finds_own_messages_with_title_snippet_and_id(store, alice, bob):
    trip = store.create_conversation(alice.id, "Trip *plans*", LOCAL.id)
    store.add_message(trip.id, alice.id, "user", "Where should I go in " + "the " * 30 + "Alps next winter?")
    store.add_message(trip.id, alice.id, "assistant", "The alps are lovely.")
    other = store.create_conversation(alice.id, "Cooking", LOCAL.id)
    store.add_message(other.id, alice.id, "user", "pasta recipe")
    theirs = store.create_conversation(bob.id, "Bob's alps", LOCAL.id)
    store.add_message(theirs.id, bob.id, "user", "secret alps hut")
    reply = await run(ctx_for(store, alice), "/search ALPS")
    assert trip.id in reply and r"Trip \*plans\*" in reply
    assert "**Alps**" in reply and "**alps**" in reply  # the match, in bold, as written
    assert "…the the" in reply  # a long message shows the part around the match
    assert other.id not in reply
    assert theirs.id not in reply and "secret" not in reply and "hut" not in reply
    assert "/select" in reply


async def test_search_without_results_and_bad_arguments(store, alice):
    reply = await run(ctx_for(store, alice), "/search nothing-like-this")
    assert "None of your messages contain" in reply
    assert "/help" in await run(ctx_for(store, alice), "/search")
    assert "/help" in await run(ctx_for(store, alice), "/search " + "x" * 201)


# ---- /rename ----------------------------------------------------------------------------
async def test_rename_the_current_conversation(store, alice):
    conv = store.create_conversation(alice.id, "old title", LOCAL.id)
    state = SessionState(conversation_id=conv.id)
    reply = await run(ctx_for(store, alice, state), "/rename   Holiday   *ideas*  ")
    assert store.get_conversation(conv.id, alice.id).title == "Holiday *ideas*"
    assert r"Holiday \*ideas\*" in reply


async def test_rename_needs_a_title_and_a_conversation(store, alice, bob):
    assert "/help" in await run(ctx_for(store, alice), "/rename")
    reply = await run(ctx_for(store, alice), "/rename Something")
    assert "no saved conversation" in reply.lower()
    theirs = store.create_conversation(bob.id, "Bob's", LOCAL.id)
    # the argument is the title: there is no way to name another conversation
    await run(ctx_for(store, alice, SessionState()), f"/rename {theirs.id}")
    assert store.get_conversation(theirs.id, bob.id).title == "Bob's"


# ---- /export ----------------------------------------------------------------------------
async def test_export_markdown_and_json(store, alice):
    conv = store.create_conversation(alice.id, "Trip: Alps/2025", LOCAL.id)
    store.add_message(conv.id, alice.id, "user", "Where should I go?")
    store.add_message(conv.id, alice.id, "assistant", "Try the mountains.")
    store.add_message(conv.id, alice.id, "assistant", "half", status="stopped")
    state = SessionState(conversation_id=conv.id)
    ctx = ctx_for(store, alice, state)
    reply = await run(ctx, "/export")
    assert "Markdown" in reply and "3 messages" in reply
    (md,) = ctx.files
    assert md.name == "Trip-Alps-2025.md" and md.mime == "text/markdown"
    text = md.data.decode("utf-8")
    assert text.startswith("# Trip: Alps/2025\n")
    assert text.index("Where should I go?") < text.index("Try the mountains.")
    assert "half" in text and "_(stopped)_" in text

    ctx = ctx_for(store, alice, state)
    await run(ctx, "/export JSON")
    (js,) = ctx.files
    assert js.name.endswith(".json") and js.mime == "application/json"
    doc = json.loads(js.data)
    assert doc["conversation"]["id"] == conv.id and doc["conversation"]["title"] == "Trip: Alps/2025"
    assert [(m["role"], m["content"], m["status"]) for m in doc["messages"]] == [
        ("user", "Where should I go?", "complete"),
        ("assistant", "Try the mountains.", "complete"),
        ("assistant", "half", "stopped"),
    ]


async def test_export_needs_a_conversation_and_a_known_format(store, alice):
    ctx = ctx_for(store, alice)
    assert "nothing to export" in (await run(ctx, "/export")).lower() and ctx.files == []
    conv = store.create_conversation(alice.id, "c", LOCAL.id)
    ctx = ctx_for(store, alice, SessionState(conversation_id=conv.id))
    assert "/help" in await run(ctx, "/export pdf") and ctx.files == []


# ---- /delete ----------------------------------------------------------------------------
async def test_delete_asks_then_deletes_on_confirm(store, alice):
    conv = store.create_conversation(alice.id, "Doomed", LOCAL.id)
    store.add_message(conv.id, alice.id, "user", "bye")
    keep = store.create_conversation(alice.id, "Keep", LOCAL.id)
    state = SessionState(conversation_id=conv.id, thread_id=conv.id)
    ctx = ctx_for(store, alice, state)
    ask = await run(ctx, "/delete")
    assert "Doomed" in ask and "/delete confirm" in ask
    assert store.get_conversation(conv.id, alice.id)  # nothing deleted yet
    done = await run(ctx, "/delete confirm")
    assert "Deleted **Doomed**" in done
    with pytest.raises(NotFound):
        store.get_conversation(conv.id, alice.id)
    assert state.conversation_id is None and state.thread_id not in (None, conv.id)  # starts fresh
    assert store.get_conversation(keep.id, alice.id)


async def test_delete_confirm_needs_a_recent_delete_for_the_same_conversation(store, alice):
    conv = store.create_conversation(alice.id, "Safe", LOCAL.id)
    other = store.create_conversation(alice.id, "Other", LOCAL.id)
    now = [1000.0]
    state = SessionState(conversation_id=conv.id)
    ctx = CommandContext(store=store, user_id=alice.id, state=state, models=[LOCAL], clock=lambda: now[0])
    assert await run(ctx, "/delete confirm") == CONFIRM_FIRST  # no /delete before
    await run(ctx, "/delete")
    now[0] += CONFIRM_WINDOW_S + 1
    assert await run(ctx, "/delete confirm") == CONFIRM_FIRST  # too late
    await run(ctx, "/delete")
    state.conversation_id = other.id  # switched meanwhile
    assert await run(ctx, "/delete confirm") == CONFIRM_FIRST
    assert store.get_conversation(conv.id, alice.id) and store.get_conversation(other.id, alice.id)
    assert "/help" in await run(ctx, "/delete everything")


async def test_delete_without_a_conversation(store, alice):
    assert "no saved conversation" in (await run(ctx_for(store, alice), "/delete")).lower()


async def test_delete_drops_the_conversations_network_session(store, alice):
    """The KV session of a deleted conversation (its token ids are the conversation) is dropped
    on the network in use; a daemon failure does not undo or hide the deletion."""
    from worker.control import ControlError, session_id_for

    class Choice:
        def current_network(self):
            return "net-abc"

    class Daemon:
        def __init__(self, fail=False):
            self.calls, self.fail = [], fail

        async def call(self, command, **args):
            self.calls.append((command, args))
            if self.fail:
                raise ControlError("conflict", "no placement")
            return {"dropped": 3}

    for fail in (False, True):
        conv = store.create_conversation(alice.id, "Secret", LOCAL.id)
        ctx = ctx_for(store, alice, SessionState(conversation_id=conv.id, thread_id=conv.id))
        daemon = Daemon(fail)
        ctx.services.update({"network_choice": Choice(), "daemon": daemon})
        await run(ctx, "/delete")
        assert daemon.calls == []
        assert "Deleted **Secret**" in await run(ctx, "/delete confirm")
        assert daemon.calls == [("session_drop", {"network_id": "net-abc",
                                                  "session_id": session_id_for("net-abc", conv.id)})]
