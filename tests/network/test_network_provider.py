"""The chat answered by a worker network: ``ControlClient.infer``, the cluster provider, the chat.

* ``ControlClient.infer`` speaks to a control endpoint over real TLS 1.3 on 127.0.0.1
  (``WireDaemon``: the daemon's wire format — credentials, the opening, scripted
  ``inference_response``/``error`` frames — without the daemon's inference, which is the
  daemon's own tests' business).
* The provider and the chat (``JarvisArgus`` with test_core's Chainlit harness, the real
  local model and tokenizer, a real SQLiteStore) run against ``ScriptedDaemon``, a stand-in
  for the control client's ``call``/``infer`` that records what it was asked.
* ``test_chat_over_network_e2e``: ``chainlit run app.py`` + three ``python -m worker``
  processes (an admin and two workers) on loopback; skipped until ``worker.cluster`` exists.
"""
from __future__ import annotations

import asyncio
import importlib.util
import re
from pathlib import Path
from typing import Optional

import pytest
from websockets.asyncio.server import serve

from argus.catalogue import ModelSpec
from argus.core import INTERRUPTED_MARK, JarvisArgus
from argus.providers import ProviderError
from argus.providers.cluster import (
    CLUSTER,
    ClusterProvider,
    PromptTools,
    chat_prompt,
    cluster_model_id,
    is_cluster_model,
    model_label,
)
from tests.chat.test_core import Chat, make_settings, rows
from worker import pki, protocol
from worker.control import (
    CONTROL_NETWORK,
    ControlClient,
    ControlError,
    DaemonUnavailable,
    ensure_control_credentials,
    session_id_for,
    write_endpoint,
)
from worker.engine import SamplingParams
from worker.link import Credentials, LinkClosed, accept

NET = "net-1a2b3c4d"
CONV = "0b7e4c1e-3f7a-4c55-9a39-2b1f8f9c6d10"


# ---------------------------------------------------------------------------
# session ids
# ---------------------------------------------------------------------------
def test_session_id_is_network_dot_conversation_with_only_id_characters():
    assert session_id_for(NET, CONV) == f"{NET}.{CONV}"
    assert session_id_for("lab1", "a b/c:d_é-9") == "lab1.abcd_-9"
    long = session_id_for(NET, "x" * 200)
    assert len(long) == protocol.MAX_ID_CHARS and long.startswith(NET + ".x")
    assert protocol.ID_PATTERN.fullmatch(long)
    # a key with nothing usable still names one stable session of its own
    assert session_id_for("lab1", "ééé") == session_id_for("lab1", "ééé") != session_id_for("lab1", "üüü")
    assert protocol.ID_PATTERN.fullmatch(session_id_for("lab1", "ééé"))


@pytest.mark.parametrize("network_id", ["", "a.b", "x" * 63, "-bad"])
def test_session_id_refuses_a_network_id_it_cannot_carry(network_id):
    with pytest.raises(ValueError):
        session_id_for(network_id, CONV)


# ---------------------------------------------------------------------------
# ControlClient.infer over a real control link
# ---------------------------------------------------------------------------
class WireDaemon:
    """A control endpoint on 127.0.0.1 with the daemon's credentials and opening; each
    ``inference_request`` is answered by ``answer(link, message)`` (run as a task, so
    later frames such as ``inference_cancel`` are still received and recorded)."""

    def __init__(self, data_dir: Path, answer):
        self.data_dir, self.answer = data_dir, answer
        self.received: list[protocol.Message] = []
        self.arrived = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> "WireDaemon":
        files = ensure_control_credentials(self.data_dir, "admin-node")
        ca = pki.load_certificate(files.ca_pem)
        creds = Credentials(CONTROL_NETWORK, "admin-node", "admin", pki.load_certificate(files.server_pem),
                            pki.load_private_key(files.server_key), ca)
        ctx = pki.server_context(creds.cert, creds.key, ca)
        self.server = await serve(lambda ws: self._handle(ws, creds), "127.0.0.1", 0, ssl=ctx,
                                  **protocol.WEBSOCKET_OPTIONS)
        write_endpoint(files, "127.0.0.1", self.server.sockets[0].getsockname()[1], "admin-node")
        return self

    async def __aexit__(self, *exc) -> None:
        for t in self.tasks:
            t.cancel()
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, ws, creds) -> None:
        link = await accept(ws, creds, pki.NonceCache())
        try:
            while True:
                m = await link.recv()
                self.received.append(m)
                self.arrived.set()
                if m.message_type == "inference_request":
                    self.tasks.append(asyncio.create_task(self.answer(link, m)))
        except LinkClosed:
            pass

    def of_type(self, message_type: str) -> list[protocol.Message]:
        return [m for m in self.received if m.message_type == message_type]

    async def wait_for(self, message_type: str, timeout: float = 10.0) -> protocol.Message:
        async def seen():
            while not self.of_type(message_type):
                self.arrived.clear()
                await self.arrived.wait()
            return self.of_type(message_type)[0]

        return await asyncio.wait_for(seen(), timeout)


def piece(text: str, token_id: int = 7, done: bool = False, reason: Optional[str] = None, usage=None) -> dict:
    return {"token_id": token_id, "text": text, "done": done, "finish_reason": reason, "usage": usage}


USAGE = {"prompt_tokens": 4, "cached_tokens": 0, "completion_tokens": 2, "prefill_ms": 12.5, "decode_tokens_s": 20.0}


async def test_infer_sends_the_request_and_yields_every_response_until_done(tmp_path):
    async def answer(link, m):
        for p in (piece(" Paris", 3681), piece(" is", 314), piece("", None, True, "stop", USAGE)):
            await link.reply(m, "inference_response", p)

    async with WireDaemon(tmp_path, answer) as daemon:
        client = ControlClient(tmp_path, timeout_s=10)
        got = [r async for r in client.infer(NET, CONV, [1, 2, 3, 4], 30, {"temperature": 0.0, "top_k": 40})]
        assert [r["text"] for r in got] == [" Paris", " is", ""]
        assert got[-1]["done"] and got[-1]["finish_reason"] == "stop" and got[-1]["usage"] == USAGE
        (request,) = daemon.of_type("inference_request")
        assert request.network_id == CONTROL_NETWORK
        assert request.session_id == f"{NET}.{CONV}"
        assert request.payload == {
            "input_ids": [1, 2, 3, 4], "attention_mask": None, "max_length": 30,
            "sampling": {**dict.fromkeys(protocol.SAMPLING_FIELDS), "temperature": 0.0, "top_k": 40},
        }
        await asyncio.sleep(0.1)
        assert daemon.of_type("inference_cancel") == []  # a finished answer is not cancelled


async def test_closing_an_answer_early_sends_inference_cancel_for_its_session(tmp_path):
    async def answer(link, m):
        await link.reply(m, "inference_response", piece(" Paris"))
        await asyncio.sleep(60)  # the rest would come much later

    async with WireDaemon(tmp_path, answer) as daemon:
        answers = ControlClient(tmp_path, timeout_s=10).infer(NET, CONV, [1, 2], 50)
        first = await answers.__anext__()
        assert first["text"] == " Paris"
        await answers.aclose()  # the stop button
        cancel = await daemon.wait_for("inference_cancel")
        assert cancel.session_id == f"{NET}.{CONV}" and cancel.network_id == CONTROL_NETWORK


async def test_the_daemons_error_becomes_control_error_with_its_sentence(tmp_path):
    sentence = "The blocks of network lab are still being sent; try again once /workers blocks says ready."

    async def answer(link, m):
        await link.send_error(protocol.Conflict(sentence), m.request_id)

    async with WireDaemon(tmp_path, answer):
        with pytest.raises(ControlError) as info:
            async for _ in ControlClient(tmp_path, timeout_s=10).infer(NET, CONV, [1, 2], 50):
                pass
        assert info.value.code == "conflict" and info.value.message == sentence


async def test_silence_longer_than_the_idle_timeout_gives_up_and_cancels(tmp_path):
    async def answer(link, m):
        await asyncio.sleep(60)

    async with WireDaemon(tmp_path, answer) as daemon:
        client = ControlClient(tmp_path, timeout_s=10, idle_timeout_s=0.5)
        with pytest.raises(DaemonUnavailable, match="sent nothing for 0.5 s"):
            async for _ in client.infer(NET, CONV, [1, 2], 50):
                pass
        await daemon.wait_for("inference_cancel")


async def test_a_connection_lost_mid_answer_is_daemon_unavailable(tmp_path):
    async def answer(link, m):
        await link.reply(m, "inference_response", piece(" Paris"))
        await link.close()

    async with WireDaemon(tmp_path, answer):
        got = []
        with pytest.raises(DaemonUnavailable, match="before the answer was complete"):
            async for r in ControlClient(tmp_path, timeout_s=10).infer(NET, CONV, [1, 2], 50):
                got.append(r["text"])
        assert got == [" Paris"]


async def test_infer_without_a_daemon_says_how_to_start_one(tmp_path):
    with pytest.raises(DaemonUnavailable, match="python -m worker"):
        async for _ in ControlClient(tmp_path / "nothing", timeout_s=2).infer(NET, CONV, [1, 2], 50):
            pass


@pytest.mark.parametrize("ids, max_length, sampling", [
    ([1, 2, 3], 3, None),  # max_length must exceed the prompt
    ([], 10, None),  # no prompt
    ([1, 2], 10, {"frequency_penalty": 0.5}),  # not a protocol field
])
async def test_an_invalid_request_is_refused_before_anything_is_sent(tmp_path, ids, max_length, sampling):
    with pytest.raises(ValueError):
        async for _ in ControlClient(tmp_path / "nothing", timeout_s=2).infer(NET, CONV, ids, max_length, sampling):
            pass


# ---------------------------------------------------------------------------
# the provider
# ---------------------------------------------------------------------------
class ScriptedDaemon:
    """Stands in for the control client (``call``, ``infer``): ``infer`` plays ``script`` (response
    payloads; an exception in it is raised there) and records each call and whether the
    answer was closed before its end."""

    def __init__(self, script=(), networks=None, call_error: Optional[Exception] = None, **replies):
        self.script = list(script)
        self.networks = networks if networks is not None else [{"network_id": "lab1", "name": "Home lab",
                                                                "model_id": "smollm2-135M-32c0b8179c87"}]
        self.call_error = call_error
        self.replies = replies  # other control commands: a result, or a function of the arguments
        self.calls: list[tuple[str, dict]] = []
        self.infers: list[dict] = []
        self.closed_early: list[bool] = []

    async def call(self, command: str, **args):
        self.calls.append((command, args))
        if self.call_error is not None:
            raise self.call_error
        if command == "network_list":
            return {"node_id": "admin-node", "networks": self.networks}
        reply = self.replies[command]
        return reply(**args) if callable(reply) else reply

    async def infer(self, network_id, conversation_key, input_ids, max_length, sampling=None):
        self.infers.append({"network_id": network_id, "key": conversation_key, "ids": list(input_ids),
                            "max_length": max_length, "sampling": sampling})
        finished = False
        try:
            for item in self.script:
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = bool(item["done"])
                yield item
        finally:
            self.closed_early.append(not finished)


class Choice:
    def __init__(self, network_id: Optional[str] = "lab1"):
        self.network_id = network_id

    def current_network(self) -> Optional[str]:
        return self.network_id


class Settings:
    max_new_tokens, temperature, top_k, top_p, repetition_penalty, model_path = 16, 0.0, 40, 0.9, 1.1, None


def provider(store, daemon, local_model, network: Optional[str] = "lab1") -> ClusterProvider:
    return ClusterProvider(Settings(), store, {"daemon": daemon, "network_choice": Choice(network)},
                           loaded_model=lambda: local_model)


SPEC = ModelSpec(provider=CLUSTER, id=cluster_model_id("lab1"), label="SmolLM2 on network Home lab", kind="chat")
HISTORY = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = [piece(" The"), piece(" capital"), piece(" is Paris."), piece("", None, True, "stop", {**USAGE, "prompt_tokens": 31, "completion_tokens": 3})]


async def test_the_prompt_is_the_local_models_and_the_session_is_the_conversation(store, local_model):
    daemon = ScriptedDaemon(ANSWER)
    stream = provider(store, daemon, local_model).stream_chat(SPEC, HISTORY, CONV)
    assert daemon.infers == []  # nothing is sent before the stream is read
    assert await stream.collect() == " The capital is Paris."
    (sent,) = daemon.infers
    expected_ids = local_model.chat(HISTORY, SamplingParams.greedy(16)).prompt_ids
    assert sent["ids"] == expected_ids and sent["network_id"] == "lab1" and sent["key"] == CONV
    assert sent["max_length"] == len(expected_ids) + 16
    wanted = {"temperature": 0.0, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1}
    assert sent["sampling"] == {k: v for k, v in wanted.items() if k in protocol.SAMPLING_FIELDS}
    assert {"temperature", "top_p", "top_k"} <= set(sent["sampling"])
    assert stream.finish_reason == "stop" and stream.usage.input_tokens == 31 and stream.usage.output_tokens == 3
    assert stream.timings["prefill_ms"] == 12.5 and stream.notice is None
    assert daemon.closed_early == [False]


async def test_a_long_conversation_drops_its_oldest_messages_exactly_as_the_local_model(store, local_model):
    filler = "Tell me more about the history of the Roman roads and bridges, please. " * 12
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i}: {filler}"} for i in range(61)]
    local = local_model.chat(history, SamplingParams.greedy(16))
    assert local.dropped_messages > 0  # the case is one that needs trimming
    ids, dropped = chat_prompt(local_model.tokenizer, history, local_model.context_length, 16)
    assert (ids, dropped) == (local.prompt_ids, local.dropped_messages)
    daemon = ScriptedDaemon(ANSWER)
    stream = provider(store, daemon, local_model).stream_chat(SPEC, history, CONV)
    await stream.collect()
    assert daemon.infers[0]["ids"] == local.prompt_ids
    assert f"oldest {local.dropped_messages} message(s) were left out" in stream.notice


async def test_no_daemon_before_any_text_is_a_network_error_with_its_sentence(store, local_model):
    down = DaemonUnavailable("No worker daemon is running (nothing at 127.0.0.1:7700). Start one with: python -m worker")
    stream = provider(store, ScriptedDaemon([down]), local_model).stream_chat(SPEC, HISTORY, CONV)
    with pytest.raises(ProviderError) as info:
        await stream.collect()
    assert info.value.kind == "network_error" and not info.value.partial
    assert str(info.value).startswith("No worker daemon is running") and str(info.value).endswith(".")


async def test_a_worker_lost_mid_answer_keeps_the_text_and_says_what_happened(store, local_model):
    lost = ControlError("internal", "Worker w2 (blocks 15-29) went away in the middle of the answer")
    daemon = ScriptedDaemon([piece(" The"), piece(" capital"), lost])
    stream = provider(store, daemon, local_model).stream_chat(SPEC, HISTORY, CONV)
    with pytest.raises(ProviderError) as info:
        await stream.collect()
    assert info.value.kind == "server_error" and info.value.partial
    assert str(info.value) == "Worker w2 (blocks 15-29) went away in the middle of the answer."
    assert stream.text == " The capital"


async def test_closing_the_stream_closes_the_answer_on_the_daemon(store, local_model):
    daemon = ScriptedDaemon([piece(" The"), piece(" capital"), piece(" is"), piece("", None, True, "stop")])
    stream = provider(store, daemon, local_model).stream_chat(SPEC, HISTORY, CONV)
    assert await stream.__anext__() == " The"
    await stream.aclose()
    assert daemon.closed_early == [True]  # the real client sends inference_cancel then


async def test_a_message_longer_than_the_context_window_is_refused_without_asking(store, local_model):
    daemon = ScriptedDaemon(ANSWER)
    huge = [{"role": "user", "content": "word " * 9000}]
    stream = provider(store, daemon, local_model).stream_chat(SPEC, huge, CONV)
    with pytest.raises(ProviderError) as info:
        await stream.collect()
    assert info.value.kind == "bad_request" and "context window holds 8192" in str(info.value)
    assert daemon.infers == []


async def test_the_model_is_named_after_the_network_and_offered_only_while_one_is_chosen(store, local_model):
    p = provider(store, ScriptedDaemon(), local_model)
    spec = await p.spec()
    assert (spec.id, spec.label, spec.kind, spec.vision) == ("cluster:lab1", "SmolLM2 on network Home lab", "chat", False)
    assert is_cluster_model(spec.id) and not is_cluster_model("gemini-2.5-flash") and not is_cluster_model("cluster:")
    down = provider(store, ScriptedDaemon(call_error=DaemonUnavailable("No worker daemon is running.")), local_model)
    assert (await down.spec()).label == "SmolLM2 on network lab1"  # the id when the daemon cannot say
    assert await provider(store, ScriptedDaemon(), local_model, network=None).spec() is None
    worker_here = ScriptedDaemon(networks=[{"network_id": "lab1", "name": "Home lab", "role": "worker"}])
    assert await provider(store, worker_here, local_model).spec() is None  # only the admin's daemon answers
    assert model_label("tinyllama-1B-abc") == "tinyllama" and model_label(None) == "SmolLM2"


async def test_prompt_tools_come_from_the_gguf_when_no_local_model_is_loaded(store, local_model):
    loads = []

    def loader():
        loads.append(1)
        return PromptTools(local_model.tokenizer, local_model.context_length)

    p = ClusterProvider(Settings(), store, {"daemon": ScriptedDaemon(ANSWER), "network_choice": Choice()},
                        tools_loader=loader)
    await p.stream_chat(SPEC, HISTORY, CONV).collect()
    await p.stream_chat(SPEC, HISTORY, CONV).collect()
    assert loads == [1]  # read once


# ---------------------------------------------------------------------------
# the chat
# ---------------------------------------------------------------------------
@pytest.fixture
def make_argus(tmp_path, monkeypatch, store, local_model):
    """``make_argus()`` → a started JarvisArgus on the real model (6 new tokens, temperature 0)."""

    def make() -> JarvisArgus:
        argus = JarvisArgus(make_settings(tmp_path, monkeypatch), store=store, model_loader=lambda: local_model)
        argus.start()
        return argus

    return make


def use_network(argus, daemon, network_id: Optional[str] = "lab1") -> None:
    argus.services["daemon"] = daemon
    argus.services["network_choice"].use(network_id)


async def test_the_chosen_network_answers_and_one_session_serves_the_whole_conversation(make_argus, store, alice):
    argus = make_argus()
    daemon = ScriptedDaemon(ANSWER)
    use_network(argus, daemon)
    chat = Chat(argus, alice)
    await chat.start()
    await chat.turn("What is the capital of France?")
    await chat.turn("And of Italy?")
    assert chat.said().count(" The capital is Paris.") == 2
    (conv,) = store.list_conversations(alice.id).items
    assert [i["key"] for i in daemon.infers] == [conv.id, conv.id]  # one session per conversation
    first, second = (i["ids"] for i in daemon.infers)
    assert len(second) > len(first)  # the whole conversation, the first answer included
    msgs = list(reversed(store.list_messages(conv.id, alice.id).items))
    assert [(m.role, m.content, m.model) for m in msgs][1] == ("assistant", " The capital is Paris.", "cluster:lab1")
    assert all(m.model == "cluster:lab1" for m in msgs)
    (bucket,) = store.list_api_usage(user_id=alice.id)
    assert (bucket.model, bucket.requests, bucket.input_tokens, bucket.output_tokens) == ("cluster:lab1", 2, 62, 6)


async def test_the_network_is_the_default_model_only_while_one_is_chosen(make_argus, store, alice, local_model):
    argus = make_argus()
    daemon = ScriptedDaemon(ANSWER)
    use_network(argus, daemon, None)
    assert not any(is_cluster_model(m.id) for m in await argus._models())
    use_network(argus, daemon)
    models = await argus._models()
    assert (models[0].id, models[0].name) == ("cluster:lab1", "SmolLM2 on network Home lab")
    assert any(m.id == local_model.model_id for m in models)
    # a user who picks the local model keeps it; the network is not asked
    chat = Chat(argus, alice)
    await chat.start()
    await chat.turn(f"/model {local_model.model_id}")
    await chat.turn("What is the capital of France?")
    assert daemon.infers == []
    assert rows(store, alice)[-1][0:2] == ("assistant", "complete")


async def test_when_the_network_cannot_answer_the_local_model_does_and_says_why(make_argus, store, alice, local_model):
    argus = make_argus()
    not_ready = ControlError("conflict", "The blocks of network lab1 are still being sent; see /workers blocks")
    use_network(argus, ScriptedDaemon([not_ready]))
    chat = Chat(argus, alice)
    await chat.start()
    await chat.turn("What is the capital of France?")
    notes = [t for t in chat.said() if "local model answers instead" in t]
    assert len(notes) == 1 and "SmolLM2 on network Home lab cannot answer right now" in notes[0]
    assert "still being sent" in notes[0]
    (conv,) = store.list_conversations(alice.id).items
    answer = list(reversed(store.list_messages(conv.id, alice.id).items))[-1]
    assert answer.status == "complete" and answer.content.strip() and answer.model == local_model.model_id


async def test_a_worker_lost_mid_answer_keeps_the_text_marked_with_a_retry(make_argus, store, alice):
    argus = make_argus()
    lost = ControlError("internal", "Worker w2 went away in the middle of the answer")
    use_network(argus, ScriptedDaemon([piece(" The"), piece(" capital"), lost]))
    chat = Chat(argus, alice)
    await chat.start()
    await chat.turn("What is the capital of France?")
    shown = [t for t in chat.said() if t.startswith(" The capital")]
    assert shown == [f" The capital\n\n{INTERRUPTED_MARK}"]
    assert rows(store, alice)[-1] == ("assistant", "error", f" The capital\n\n{INTERRUPTED_MARK}")
    assert not [t for t in chat.said() if "answers instead" in t]


async def test_rebalance_shows_the_transfers_as_a_task_list_in_the_chat(make_argus, store, alice, monkeypatch):
    import json

    from chainlit.config import FILES_DIRECTORY

    from argus.commands import workers
    from tests.chat.test_core import RecordingEmitter

    class ElementEmitter(RecordingEmitter):
        async def send_element(self, element_dict):
            self._record("element", dict(element_dict))

    FILES_DIRECTORY.mkdir(parents=True, exist_ok=True)  # an earlier in-process Chainlit shutdown may remove it
    monkeypatch.setattr(workers, "POLL_S", 0.0)
    steps = iter([
        [{"node_id": "pi-4", "block_range": "14-29", "state": "receiving", "sent_bytes": 10 << 20,
          "total_bytes": 40 << 20, "message": ""}],
        [{"node_id": "pi-4", "block_range": "14-29", "state": "loaded", "sent_bytes": 40 << 20,
          "total_bytes": 40 << 20, "message": ""}],
    ])

    def status(network_id):
        workers_now = next(steps)
        return {"epoch": 3, "ready": workers_now[0]["state"] == "loaded", "workers": workers_now}

    argus = make_argus()
    use_network(argus, ScriptedDaemon(placement_apply={"epoch": 3, "placement": {}}, distribution_status=status), None)
    chat = Chat(argus, alice)
    chat.emitter = ElementEmitter(chat.session)
    await chat.start()
    await chat.turn("/workers rebalance lab1")
    lists = [d for kind, d in chat.emitter.events if kind == "element" and d["type"] == "tasklist"]
    assert len(lists) == 2 and len({d["id"] for d in lists}) == 1  # one task list, updated in place
    shown = [json.loads(Path(chat.session.files[d["chainlitKey"]]["path"]).read_text()) for d in lists]
    assert shown[0]["tasks"] == [{"title": "pi-4: blocks 14-29, 10.0/40.0 MiB (25%)", "status": "running", "forId": None}]
    assert shown[1]["status"] == "Ready" and shown[1]["tasks"][0]["status"] == "done"
    assert "is ready" in chat.said()[-1] and "/network use lab1" in chat.said()[-1]


# ---------------------------------------------------------------------------
# end to end: the chat server and three daemons
# ---------------------------------------------------------------------------
CLUSTER_READY = importlib.util.find_spec("worker.inference") is not None
TOKEN = re.compile(r"argus1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
MAX_NEW = 24


@pytest.mark.e2e
@pytest.mark.skipif(not CLUSTER_READY, reason="worker.cluster (the daemon's side of issue 6) is not there yet")
async def test_chat_over_network_e2e(tmp_path, local_model):
    from tests.support.daemons import start_daemon, wait_for
    from tests.support.live_server import Chat as LiveChat, history_env, said, serve, sign_in, sign_up

    async def ask(chat, text: str) -> tuple[str, list]:
        events, _ = await chat.turn(text)
        replies = said(events)
        assert replies, f"no reply to {text!r}"
        return replies[-1]["output"], events

    def greedy(history: list[dict]) -> str:
        return "".join(local_model.chat(history, SamplingParams.greedy(MAX_NEW)))

    admin = start_daemon(tmp_path / "admin-daemon", "admin")
    w1 = start_daemon(tmp_path / "w1", "w1")
    w2 = start_daemon(tmp_path / "w2", "w2")
    env = history_env(
        tmp_path, ARGUS_WORKER_DATA_DIR=str(admin.data_dir), ARGUS_TEMPERATURE="0", ARGUS_REPETITION_PENALTY="1.0",
        ARGUS_MAX_NEW_TOKENS=str(MAX_NEW),
    )
    try:
        nid = (await admin.call("network_create", name="lab", auto_approve=True, port=None))["network"]["network_id"]
        for w in (w1, w2):
            token = (await admin.call("token_issue", network_id=nid, ttl_s=900))["token"]
            await w.call("network_join", token=token)

        async def both_online():
            workers = (await admin.call("workers_list", network_id=nid))["workers"]
            return sum(w["state"] == "online" for w in workers) == 2

        await wait_for(both_online, timeout=60, what="both workers online")
        for w in (w1, w2):
            await admin.call("worker_allocate", network_id=nid, node_id=w.node_id, cpu_share=None,
                             ram_bytes=2 << 30, disk_bytes=None)

        with serve(tmp_path, env, "chat") as srv:
            sign_up(srv, "alice@example.com", "Alice")
            async with LiveChat(srv, sign_in(srv, "alice@example.com"), name="Alice") as alice:
                plan, _ = await ask(alice, "/workers plan")
                for w in (w1, w2):
                    row = next(line for line in plan.splitlines() if w.node_id in line)
                    assert "| none |" not in row, plan  # both workers run blocks
                ready, events = await ask(alice, "/workers rebalance")
                assert "is ready" in ready and f"/network use {nid}" in ready, ready
                assert [d for ev, d in events if ev == "element" and d.get("type") == "tasklist"]  # progress shown
                used, _ = await ask(alice, f"/network use {nid}")
                assert nid in used

                question = "What is the capital of France?"
                answer, events = await ask(alice, question)
                texts = [d["output"] for d in said(events)]
                assert not [t for t in texts if "answers instead" in t], texts  # no fallback to the local model
                assert answer == greedy([{"role": "user", "content": question}])

                follow_up = "And what is the capital of Italy?"
                answer2, _ = await ask(alice, follow_up)  # the same session: only the new tokens are computed
                assert answer2 == greedy([
                    {"role": "user", "content": question}, {"role": "assistant", "content": answer},
                    {"role": "user", "content": follow_up},
                ])

                sessions, _ = await ask(alice, "/network sessions")
                assert question in sessions and w1.node_id in sessions and w2.node_id in sessions, sessions
                sid = re.search(rf"`({re.escape(nid)}\.[A-Za-z0-9_-]+)`", sessions).group(1)
                dropped, _ = await ask(alice, f"/network sessions drop {sid}")
                assert "Dropped session" in dropped, dropped
                assert sid not in (await ask(alice, "/network sessions"))[0]
    finally:
        for d in (w1, w2, admin):
            d.stop()
