"""Chatting with Gemini end to end: the real ``chainlit run app.py`` with ``GEMINI_API_KEYS``
and ``GEMINI_BASE_URL`` pointing at the Gemini fake (tests/support/fakes, on 127.0.0.1, in a thread of
this process), a browser-like socket.io client, and the fake's record of what was sent.

Two keys: the first one the pool hands out is rate limited, so the answer also proves the
failover inside the real server. An admin adds a third key with ``/keys add``: the message is
removed from the chat, and neither the server's log nor its data directory ever holds a key.
Nothing reaches a real provider: OpenAI's and Anthropic's base URLs point at a closed
loopback port and the server has no keys for them.
"""
from __future__ import annotations

import pytest

from argus.providers import fingerprint
from tests.support.fakes.fixtures import DEAD_URL
from tests.support.fakes.gemini_server import FakeGemini
from tests.support.live_server import Chat, history_env, said, serve, sign_in, sign_up

pytestmark = pytest.mark.e2e

ALICE = "alice@example.com"
ANSWER = "Hello, world!"


def provider_env(gemini_url: str, keys: list[str]) -> dict[str, str]:
    """Provider variables for the server: Gemini at the fake, everything else empty or dead."""
    return {
        "GEMINI_API_KEYS": ",".join(keys), "GEMINI_API_KEY": "", "GEMINI_BASE_URL": gemini_url,
        "GOOGLE_API_KEY": "", "GOOGLE_GEMINI_BASE_URL": DEAD_URL,
        "OPENAI_API_KEYS": "", "OPENAI_API_KEY": "", "OPENAI_BASE_URL": DEAD_URL + "/v1",
        "ANTHROPIC_API_KEYS": "", "ANTHROPIC_API_KEY": "", "ANTHROPIC_BASE_URL": DEAD_URL,
        "ARGUS_SECRET_KEY": "", "ARGUS_API_TIER": "free", "ARGUS_DEFAULT_MODEL": "", "ARGUS_CATALOGUE": "",
    }


async def test_chat_with_gemini_through_the_real_server(tmp_path):
    fake = FakeGemini()
    with fake.running_in_thread() as url:
        keys = [fake.key_for("429"), fake.key_for("ok")]
        env = history_env(tmp_path, **provider_env(url, keys))
        added = "AIzaSyE2EADDED" + "e" * 25
        with serve(tmp_path, env) as srv:
            sign_up(srv, ALICE, "Alice")  # the first account: an administrator
            token = sign_in(srv, ALICE)
            async with Chat(srv, token, name="Alice") as chat:
                settings = [d for ev, d in chat.events if ev == "chat_settings"]
                offered = [i["value"] for i in settings[-1][0]["items"]]
                assert offered[0] == "gemini-2.5-flash" and "gpt-4o-mini" not in offered

                events, _ = await chat.turn("Hello Gemini, who are you?")
                assert said(events)[-1]["output"] == ANSWER
                tokens = [d for ev, d in events if ev == "stream_token"]
                assert tokens, "the answer was streamed"
                events, _ = await chat.turn("And a second question?")
                assert said(events)[-1]["output"] == ANSWER

                mark, step_id = await chat.send(f"/keys add gemini {added}")
                i = await chat.wait_index(lambda e: e[0] == "task_end", mark, 60)
                removed = [d for ev, d in chat.events[mark:i] if ev == "delete_message"]
                assert [d["id"] for d in removed] == [step_id] and removed[0]["output"] == ""
                reply = said(chat.events[mark:i])[-1]["output"]
                assert fingerprint(added) in reply and added not in reply

                events, _ = await chat.turn("/keys list")
                listing = said(events)[-1]["output"]
                assert all(fingerprint(k) in listing for k in [*keys, added])

            streamed = fake.find(":streamGenerateContent")
            assert {r.key for r in streamed} == set(keys)  # the rate-limited key was tried, then the next
            last = streamed[-1].json["contents"]
            assert [c["role"] for c in last] == ["user", "model", "user"]
            assert last[-1]["parts"][0]["text"] == "And a second question?"
            log = srv.log_path.read_text(errors="replace")
        data = b"".join(p.read_bytes() for p in sorted(srv.data_dir.rglob("*")) if p.is_file())
        for key in [*keys, added]:
            assert key not in log, "a key reached the server log"
            assert key.encode() not in data, "a key reached the data directory in clear"
