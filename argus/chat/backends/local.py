"""The local model as a chat back-end: loaded once in the background, generating on a thread.

:class:`ModelHolder` loads :class:`worker.engine.LocalModel` once in a daemon thread at
start-up; if loading fails, the :class:`~worker.engine.ModelLoadError` sentence is kept
and every answer is that sentence (no traceback reaches the user). An answer is the
model's sync generator driven on a producer thread (``argus.streaming.stream_pieces``);
it takes a generation slot (CPU and a KV cache).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Callable, Optional, Sequence

from argus.chat.backends.base import BackendUnavailable, Sink, Streamed
from argus.chat.history import as_messages
from argus.chat.sentences import GENERATION_FAILED, without_token_limit_mark
from argus.catalogue import ModelSpec
from argus.commands import ModelInfo
from argus.store.base import Message
from argus.streaming import StreamHandle, stream_pieces
from worker.engine import LocalModel, ModelLoadError, SamplingParams

log = logging.getLogger(__name__)

#: Id/name used for the local model while it is loading or when it failed.
LOCAL_MODEL_FALLBACK_ID = "local"


class ModelHolder:
    """Loads the model once in a daemon thread and hands it out.

    Args:
        loader: blocking callable returning the model; raises ModelLoadError
            (any other exception is wrapped in one, details logged).
    """

    def __init__(self, loader: Callable[[], LocalModel]):
        self._loader = loader
        self._future: concurrent.futures.Future = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> None:
        """Begin loading (idempotent; returns at once)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            # RUNNING futures cannot be cancelled: a cancelled waiter (stop
            # button during the load) must not cancel the load for everyone.
            self._future.set_running_or_notify_cancel()
        threading.Thread(target=self._load, name="argus-model-load", daemon=True).start()

    def _load(self) -> None:
        try:
            model = self._loader()
        except ModelLoadError as e:
            log.error("model load failed: %s", e)
            self._future.set_exception(e)
        except BaseException as e:  # a bug or MemoryError: keep the server up, say so
            log.exception("model load crashed")
            self._future.set_exception(ModelLoadError(f"The local model could not be loaded ({type(e).__name__}: {e})."))
        else:
            log.info("model loaded: %s", getattr(model, "model_id", "?"))
            self._future.set_result(model)

    async def get(self) -> LocalModel:
        """The model, waiting for the load to finish without blocking the loop.

        Raises:
            ModelLoadError: loading failed (the same error every time).
        """
        self.start()
        return await asyncio.wrap_future(self._future)

    def loaded(self) -> Optional[LocalModel]:
        """The model if it has finished loading (successfully), else None; never waits."""
        f = self._future
        if f.done() and f.exception() is None:
            return f.result()
        return None

    def info(self) -> ModelInfo:
        """What ``/model`` shows, without waiting."""
        if not self._future.done():
            return ModelInfo(id=LOCAL_MODEL_FALLBACK_ID, name="Local model", loading=True)
        err = self._future.exception()
        if err is not None:
            return ModelInfo(id=LOCAL_MODEL_FALLBACK_ID, name="Local model", problem=str(err))
        m = self._future.result()
        return ModelInfo(id=m.model_id, name=m.display_name)


def model_messages(rows: Sequence[Message]) -> list[dict]:
    """``[{"role", "content"}]`` of ``rows`` as the model reads them back: the stored answers
    without the token-limit note the reader was shown (:func:`~argus.chat.sentences.token_limit_mark`)."""
    return [
        {**m, "content": without_token_limit_mark(m["content"])} if m["role"] == "assistant" else m
        for m in as_messages(rows)
    ]


class LocalTurn:
    """One answer of the local model to ``history`` (``[{"role", "content"}]``)."""

    def __init__(self, model: LocalModel, history: list[dict], params: SamplingParams):
        self.model, self.history, self.params = model, history, params

    async def stream(self, sink: Sink, handle: StreamHandle) -> Streamed:
        """Generate on the ``argus-generate`` thread into ``sink``; ``result.producer`` is that
        thread (the generation slot is free once it has ended). ``cut_at`` is set when the
        answer reached ``params.max_tokens`` (finish ``"length"`` with that many tokens; a
        ``"length"`` with fewer is the context window's end, said by the generation's notice)."""
        model, history, params = self.model, self.history, self.params
        result = await stream_pieces(
            lambda: model.chat(history, params, handle.cancel_event), sink, handle, thread_name="argus-generate",
        )
        gen: Any = result.source
        finish = getattr(gen, "finish_reason", None)
        cut_at = None
        if finish == "length" and getattr(gen, "completion_tokens", 0) >= params.max_tokens:
            cut_at = params.max_tokens
        return Streamed(
            result, model.model_id, notice=getattr(gen, "notice", None), finish=finish, cut_at=cut_at,
            cancelled=result.task_cancelled, retryable=False,
        )


class LocalBackend:
    """The local model as a :class:`~argus.chat.backends.base.ChatBackend`.

    Args:
        holder: the model, loading in the background.
        sampling: the sampling of one answer (``Settings.sampling_params``).
    """

    holds_slot = True

    def __init__(self, holder: ModelHolder, sampling: Callable[[], SamplingParams]):
        self.holder = holder
        self.sampling = sampling

    async def open_turn(self, spec: Optional[ModelSpec], rows: Sequence[Message], turn: Any) -> LocalTurn:
        """Wait for the model; raises BackendUnavailable with the load failure's sentence."""
        try:
            model = await self.holder.get()
        except ModelLoadError as e:
            raise BackendUnavailable(str(e) or GENERATION_FAILED) from None
        return LocalTurn(model, model_messages(rows), self.sampling())
