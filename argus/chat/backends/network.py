"""The worker network as a chat back-end: the model split over the daemons of a network (issue 6).

When an administrator has chosen a network with ``/network use``
(:mod:`argus.network_choice`) and this machine is that network's admin, the chat
offers "SmolLM2 on network <name>" and makes it the default model of new
messages (a user may still pick another one with ``/model`` or the composer's
settings). Otherwise it is not offered at all.

An answer is one :meth:`worker.control.ControlClient.infer` call to this
machine's daemon (the network's admin), which drives the workers' block ranges
and streams the generated text back:

* the prompt is the stored conversation rendered with the GGUF's own chat
  template and tokenizer (``worker.engine.tokenizer``), exactly as the local
  model renders it (``LocalModel.chat``): the oldest messages are dropped first
  when it does not fit the context window with room for the answer;
* one session per conversation (``session_id_for(network, conversation id)``):
  the workers keep its KV caches, so a continued conversation computes only the
  tokens that are new since its last answer;
* the text streams through the same :class:`~argus.providers.base.ChatStream`
  as every remote provider's, and the usage is recorded in the store's usage
  buckets (key id and model: the model id ``cluster:<network id>``; the stored
  provider name and id prefix stay ``cluster`` so existing rows keep their meaning).

Failures come out of the stream as :class:`ProviderError` with one sentence for
the user: ``network_error`` (no daemon, connection lost, nothing heard for the
idle timeout), ``server_error`` (the daemon refused or failed: blocks still
being distributed, a worker vanished mid-answer), ``bad_request`` (the message
alone does not fit the context window); ``partial`` is set when text had
already been streamed (the caller keeps it).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable, Optional, Sequence

from argus.catalogue import ModelSpec
from argus.config import sampling_params
from argus.chat.backends.base import BackendUnavailable, Sink, Streamed
from argus.chat.backends.local import model_messages
from argus.chat.sentences import MESSAGE_NOT_FOUND
from argus.chat.shield import unstoppable
from argus.keys.pool import utc_day
from argus.providers.base import ChatStream, ProviderError, Usage
from argus.store.base import Message, Store, StoreError
from argus.streaming import StreamHandle, stream_async_pieces
from worker.control import ControlError, DaemonUnavailable
from worker.engine.gguf_file import ModelFile, ModelLoadError, default_model_path
from worker.engine.model import fit_chat
from worker.engine.tokenizer import Tokenizer, TokenizerError
from worker.protocol import SAMPLING_FIELDS

log = logging.getLogger(__name__)

#: The provider name of the worker network (stored with usage rows; the value predates "network") (``ModelSpec.provider``, ``ProviderError.provider``).
NETWORK_PROVIDER = "cluster"
#: Model ids of the worker network: this prefix, then the network id.
MODEL_PREFIX = "cluster:"
#: What the networks run (``worker/daemon.py`` serves SmolLM2-135M); the label's model part
#: when the daemon does not say.
DEFAULT_MODEL_LABEL = "SmolLM2"
#: Known model-id prefixes (``ModelFile.model_id`` starts with the GGUF's basename) → how to show them.
MODEL_LABELS = {"smollm2": "SmolLM2"}
#: Seconds a network's name (for the label) is remembered, and the longest wait to ask for it.
NAME_CACHE_S = 30.0
NAME_LOOKUP_TIMEOUT_S = 2.0
#: The highest temperature the protocol carries (``protocol.SAMPLING_FIELDS``).
MAX_TEMPERATURE = 5.0
#: Sentence when the chat server has no daemon client (a server built without one).
NOT_CONFIGURED = "The worker network is not set up on this server, so there is no worker daemon to ask."


def network_model_id(network_id: str) -> str:
    """The model id of network ``network_id``: ``"cluster:<network_id>"``."""
    return MODEL_PREFIX + network_id


def is_network_model(model_id: Optional[str]) -> bool:
    """Whether ``model_id`` names a worker network (``"cluster:…"``)."""
    return bool(model_id) and model_id.startswith(MODEL_PREFIX) and len(model_id) > len(MODEL_PREFIX)


def network_of(model_id: str) -> str:
    """The network id in a network model id. Raises ValueError for another id."""
    if not is_network_model(model_id):
        raise ValueError(f"{model_id!r} is not a worker-network model id ({MODEL_PREFIX}<network id>)")
    return model_id[len(MODEL_PREFIX):]


def model_label(model_id: Optional[str]) -> str:
    """How a network's model is named: ``"smollm2-135M-32c0b8179c87"`` → ``"SmolLM2"``
    (:data:`MODEL_LABELS`), another id → its first dash-separated part, None → the default."""
    if not model_id:
        return DEFAULT_MODEL_LABEL
    head = model_id.split("-", 1)[0]
    return MODEL_LABELS.get(head.lower(), head)


def _sentence(text: str) -> str:
    text = " ".join(str(text).split())
    return text if not text or text[-1] in ".!?)" else text + "."


# ---------------------------------------------------------------------------
# The prompt.
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptTools:
    """What building a prompt needs: the GGUF's tokenizer (with its chat template) and the
    model's context window in tokens."""

    tokenizer: Tokenizer
    context_tokens: int


def load_prompt_tools(model_path: Optional[str] = None) -> PromptTools:
    """The tokenizer and context length of the GGUF at ``model_path`` (default: the packaged
    model, ``default_model_path()``) — the same file the daemons serve. Blocking (about 3 s:
    the GGUF's metadata is parsed; no weight is read).

    Raises:
        ModelLoadError: the file is missing, not a Llama GGUF, or its tokenizer is unusable.
    """
    mf = ModelFile(model_path or default_model_path())
    try:
        tokenizer = Tokenizer.from_gguf(mf.reader)
    except TokenizerError as e:
        raise ModelLoadError(f"{mf.path}: {e}") from None
    return PromptTools(tokenizer, mf.config.context_length)


def chat_prompt(
    tokenizer: Tokenizer, messages: Sequence[dict], context_tokens: int, max_tokens: int
) -> tuple[list[int], int]:
    """The token ids of ``messages`` (``[{"role", "content"}]``, oldest first) under the chat
    template, with the generation prompt, and how many old messages were dropped to fit.

    Same rule as ``LocalModel.chat``: the prompt may take ``context_tokens - min(max_tokens,
    context_tokens // 4)`` tokens; when it does not, the oldest messages after a leading system
    message are dropped, the fewest that fit (binary search: O(log n) encodings), the newest
    message always kept. The result may still be longer than the window (one huge message);
    the caller refuses it.
    """
    return fit_chat(tokenizer, messages, context_tokens, max_tokens)


# ---------------------------------------------------------------------------
# The stream.
# ---------------------------------------------------------------------------
class NetworkStream(ChatStream):
    """A :class:`ChatStream` of a network's answer; after iteration also:

    ``notice``: a sentence for the user (old messages left out to fit, answer cut off by the
    context window), or None; ``cut_at``: the max-new-tokens limit when the answer ended by
    reaching it (finish ``"length"`` short of the context window), else None; ``timings``: the daemon's usage record of the answer
    (``prompt_tokens``, ``cached_tokens``, ``completion_tokens``, ``prefill_ms``,
    ``decode_tokens_s``), empty until the last message.
    """

    def __init__(self, source: Callable[["NetworkStream"], AsyncIterator[str]], map_error: Callable[[BaseException], ProviderError]):
        super().__init__(NETWORK_PROVIDER, source, map_error)  # type: ignore[arg-type]
        self.notice: Optional[str] = None
        self.cut_at: Optional[int] = None
        self.timings: dict = {}


def map_error(exc: BaseException) -> ProviderError:
    """The ProviderError (one sentence for the user) of a failure while answering on a network."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, DaemonUnavailable):
        return ProviderError("network_error", _sentence(str(exc)), provider=NETWORK_PROVIDER, detail=str(exc))
    if isinstance(exc, ControlError):
        kind = "bad_request" if exc.code in ("invalid_payload", "frame_too_large") else "server_error"
        text = exc.message or f"The worker network refused to answer ({exc.code})"
        return ProviderError(kind, _sentence(text), provider=NETWORK_PROVIDER, detail=f"{exc.code}: {exc.message}")
    if isinstance(exc, ModelLoadError):
        return ProviderError("server_error", _sentence(str(exc)), provider=NETWORK_PROVIDER, detail=str(exc))
    return ProviderError(
        "server_error", "The worker network failed while answering; please try again in a moment.",
        provider=NETWORK_PROVIDER, detail=repr(exc),
    )


class NetworkBackend:
    """The worker network chosen with ``/network use``, as a chat model and a
    :class:`~argus.chat.backends.base.ChatBackend` (answers compute on the workers: no
    generation slot here).

    Args:
        settings: ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
            ``repetition_penalty`` (the answer's sampling, as for every model) and ``model_path`` (the GGUF whose tokenizer and
            chat template build the prompt; the daemons serve the same file).
        store: where usage is recorded (``record_api_usage``).
        services: the chat server's services (``JarvisArgus.services``): ``"daemon"`` (a
            :class:`~worker.control.ControlClient`, or anything with its ``call`` and
            ``infer``) and ``"network_choice"`` (:class:`~argus.network_choice.NetworkChoice`),
            read at each use so a replaced one takes effect at once.
        loaded_model: returns the local model once it is loaded (its tokenizer is then
            reused), else None.
        tools_loader: blocking; returns the :class:`PromptTools` when no local model is
            loaded (default :func:`load_prompt_tools` of ``settings.model_path``).
        clock: seconds, for the name cache (monotonic).
    """

    holds_slot = False

    def __init__(
        self,
        settings: Any,
        store: Store,
        services: dict,
        *,
        loaded_model: Callable[[], Any] = lambda: None,
        tools_loader: Optional[Callable[[], PromptTools]] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self.store = store
        self.services = services
        self._loaded_model = loaded_model
        self._tools_loader = tools_loader or (lambda: load_prompt_tools(settings.model_path))
        self._tools: Optional[PromptTools] = None
        self._tools_lock = threading.Lock()
        self._clock = clock
        #: network id → (label, this machine is its admin, expires at)
        self._labels: dict[str, tuple[str, bool, float]] = {}

    # ---- which network --------------------------------------------------------
    def network_id(self) -> Optional[str]:
        """The network chosen with ``/network use``, or None (also when the server has no
        network choice). Reads a small file; no daemon call."""
        choice = self.services.get("network_choice")
        return choice.current_network() if choice is not None else None

    def model_id_now(self) -> Optional[str]:
        """The model id of the chosen network (``cluster:<id>``), or None; never waits."""
        nid = self.network_id()
        return network_model_id(nid) if nid else None

    async def spec(self) -> Optional[ModelSpec]:
        """The chat model of the chosen network ("SmolLM2 on network <name>"; the id when the
        daemon cannot say its name within :data:`NAME_LOOKUP_TIMEOUT_S`), or None when no
        network is chosen or this machine is not its admin (only the admin's daemon runs
        answers on it)."""
        nid = self.network_id()
        if nid is None:
            return None
        label, offered = await self._describe(nid)
        if not offered:
            return None
        tools = self._tools
        return ModelSpec(
            provider=NETWORK_PROVIDER, id=network_model_id(nid), label=label, kind="chat",
            context_tokens=tools.context_tokens if tools is not None else 0,
        )

    async def _describe(self, nid: str) -> tuple[str, bool]:
        """(label, whether this machine is the network's admin) from the daemon's ``network_list``,
        remembered for :data:`NAME_CACHE_S`; when the daemon cannot say: (the id, True), so the
        chat tries it and the reason it cannot answer is shown."""
        cached = self._labels.get(nid)
        now = self._clock()
        if cached is not None and cached[2] > now:
            return cached[0], cached[1]
        name, model, admin = nid, None, True
        daemon = self.services.get("daemon")
        if daemon is not None:
            try:
                listing = await asyncio.wait_for(daemon.call("network_list"), NAME_LOOKUP_TIMEOUT_S)
                net = next((n for n in listing.get("networks", []) if n.get("network_id") == nid), None)
                if net is not None:
                    name = str(net.get("name") or nid)
                    model = net.get("model_id")
                    admin = net.get("role", "admin") == "admin"
            except (DaemonUnavailable, ControlError, asyncio.TimeoutError) as exc:
                log.info("the name of network %s is unknown for now: %s", nid, exc)
        label = f"{model_label(model)} on network {name}"
        self._labels[nid] = (label, admin, now + NAME_CACHE_S)
        return label, admin

    # ---- answering ----------------------------------------------------------------
    async def tools(self) -> PromptTools:
        """The tokenizer and context length (the local model's when loaded, else read once
        from the GGUF in a thread). Raises ModelLoadError."""
        if self._tools is None:
            model = self._loaded_model()
            if model is not None:
                self._tools = PromptTools(model.tokenizer, model.context_length)
            else:
                self._tools = await asyncio.to_thread(self._load_tools)
        return self._tools

    def _load_tools(self) -> PromptTools:
        with self._tools_lock:
            if self._tools is None:
                self._tools = self._tools_loader()
            return self._tools

    def sampling(self) -> dict:
        """The answer's sampling for the daemon (``SamplingParams.to_wire()`` of
        :func:`argus.config.sampling_params`, as for every model), clamped to what the protocol carries:
        temperature (0 is greedy) at most :data:`MAX_TEMPERATURE`, the repetition penalty within
        0.01..10; only the fields ``protocol.SAMPLING_FIELDS`` carries, and no null ones."""
        params = sampling_params(self.settings)
        params = replace(
            params, temperature=min(params.temperature, MAX_TEMPERATURE),
            repetition_penalty=min(max(params.repetition_penalty, 0.01), 10.0),
        )
        return {k: v for k, v in params.to_wire().items() if k in SAMPLING_FIELDS and v is not None}

    def stream_chat(self, spec: ModelSpec, messages: Sequence[dict], conversation_key: str) -> NetworkStream:
        """A stream of the answer to ``messages`` (``[{"role", "content"}]``, oldest first, the
        last the user's message) on the network ``spec`` names, in the session of
        ``conversation_key`` (the conversation id). Nothing is sent until it is iterated.

        Raises (from iteration) ProviderError, see the module docstring.
        """
        network_id = network_of(spec.id)
        max_new = int(self.settings.max_new_tokens)

        async def source(stream: NetworkStream) -> AsyncIterator[str]:
            daemon = self.services.get("daemon")
            if daemon is None:
                raise ProviderError("server_error", NOT_CONFIGURED, provider=NETWORK_PROVIDER)
            tools = await self.tools()
            ctx = tools.context_tokens
            ids, dropped = await asyncio.to_thread(chat_prompt, tools.tokenizer, messages, ctx, max_new)
            if len(ids) >= ctx:
                raise ProviderError(
                    "bad_request",
                    f"Your message is {len(ids)} tokens long and this model's context window holds {ctx}; "
                    "please send a shorter message.",
                    provider=NETWORK_PROVIDER,
                )
            if dropped:
                stream.notice = (
                    "The conversation is longer than the model can read at once; "
                    f"the oldest {dropped} message(s) were left out."
                )
            max_length = min(len(ids) + max_new, ctx)
            generated = 0
            async with contextlib.aclosing(
                daemon.infer(network_id, conversation_key, ids, max_length, self.sampling())
            ) as answers:
                async for r in answers:
                    if r.get("token_id") is not None:
                        generated += 1
                    if r.get("text"):
                        yield r["text"]
                    if r.get("done"):
                        stream.finish_reason = r.get("finish_reason")
                        stream.timings = dict(r.get("usage") or {})
                        prompt = int(stream.timings.get("prompt_tokens", len(ids)))
                        completion = int(stream.timings.get("completion_tokens", generated))
                        stream.usage = Usage(prompt, completion, prompt + completion)
                        if stream.finish_reason == "length" and max_length < len(ids) + max_new:
                            stream.notice = "The answer was cut off: it reached the end of the model's context window."
                        elif stream.finish_reason == "length":
                            stream.cut_at = max_new
                        log.info("network %s answered session of %s: %s", network_id, conversation_key, stream.timings)
                        return
            raise ProviderError(
                "server_error", "The worker network stopped answering before the end; please try again.",
                provider=NETWORK_PROVIDER,
            )

        return NetworkStream(source, map_error)

    async def open_turn(self, spec: Optional[ModelSpec], rows: Sequence[Message], turn: Any) -> NetworkTurn:
        """The answer to ``turn`` in the conversation's session on the network ``spec`` names
        (nothing is sent until it streams). Raises BackendUnavailable when the message to
        answer is not among ``rows``."""
        assert spec is not None and is_network_model(spec.id), "a network answer needs the network's model"
        history = model_messages(rows)
        if not history:
            raise BackendUnavailable(MESSAGE_NOT_FOUND)
        return NetworkTurn(self, spec, self.stream_chat(spec, history, turn.conv_id), turn.user_id)

    async def record_usage(self, spec: ModelSpec, stream: ChatStream, user_id: str) -> None:
        """Count the answer (its ``usage``; none counts the request alone) for ``user_id`` in the
        store's usage buckets, under key id and model ``spec.id``. A store failure is logged:
        the answer itself stands."""
        usage = stream.usage
        now = time.time()
        try:
            await asyncio.to_thread(
                self.store.record_api_usage, spec.id, user_id, spec.id, now=now, day=utc_day(now),
                usage_day=utc_day(now), input_tokens=usage.input_tokens if usage else 0,
                output_tokens=usage.output_tokens if usage else 0,
            )
        except StoreError as exc:
            log.warning("the usage of an answer on %s was not recorded: %s", spec.id, exc)


class NetworkTurn:
    """One answer on the network ``spec`` names (:meth:`NetworkBackend.open_turn`)."""

    def __init__(self, backend: "NetworkBackend", spec: ModelSpec, stream: NetworkStream, user_id: str):
        self.backend, self.spec, self.chat_stream, self.user_id = backend, spec, stream, user_id

    async def stream(self, sink: Sink, handle: StreamHandle) -> Streamed:
        """Stream the network's answer into ``sink``; the usage is recorded once text came.
        Raises BackendUnavailable when the network could not start an answer (no daemon,
        blocks not loaded, …; nothing was streamed); a message too long for the model is
        answered with that sentence."""
        stream = self.chat_stream
        result = await stream_async_pieces(stream, sink, handle)
        error = result.error if isinstance(result.error, ProviderError) else None
        cancelled = result.task_cancelled
        if not cancelled and result.status == "error" and not result.pieces and not result.sink_failed:
            if error is None or error.kind != "bad_request":
                raise BackendUnavailable(str(result.error) or "the worker network failed")
        if result.pieces or result.status == "complete":
            _, again = await unstoppable(self.backend.record_usage(self.spec, stream, self.user_id))
            cancelled = cancelled or again
        return Streamed(
            result, self.spec.id, error=error, notice=stream.notice, finish=stream.finish_reason,
            cut_at=stream.cut_at, cancelled=cancelled,
        )


__all__ = [
    "MODEL_PREFIX",
    "NETWORK_PROVIDER",
    "NetworkBackend",
    "NetworkStream",
    "NetworkTurn",
    "PromptTools",
    "chat_prompt",
    "is_network_model",
    "load_prompt_tools",
    "map_error",
    "model_label",
    "network_model_id",
    "network_of",
]
