"""Bridge a blocking iterator of text pieces (run in a thread) to async consumers.

The local model produces text by a *blocking* iterator.
:func:`stream_pieces` runs that iterator in a dedicated producer thread and
hands every piece to the event loop with ``loop.call_soon_threadsafe(
queue.put_nowait, item)``; the consumer coroutine awaits the queue and passes
each piece to an async ``sink`` (in the chat handler: ``msg.stream_token``).
The event loop is never blocked.

Stopping: a :class:`threading.Event` is shared with the producer (and can be
passed on to the model, which checks it between tokens). It is set

* by Chainlit's stop button (``@cl.on_stop`` → :meth:`StreamHandle.cancel`), or
* when the consuming task is cancelled (Chainlit cancels the ``on_message``
  task on stop): the ``CancelledError`` is caught, the event set, and the
  partial text kept in the result (``status == "stopped"``,
  ``task_cancelled == True``) so the caller can store it and then re-raise.

A producer exception never escapes into the loop: it becomes a result with
``status == "error"`` and the exception in :attr:`StreamResult.error`. So does
a failing ``sink`` (e.g. the browser's socket is gone): the producer is
stopped through the cancel event and the text so far is kept, so the caller's
usual save path stores the partial answer. Nothing is logged here: the caller
knows the context and logs the error once.

Remote providers produce an *async* iterator (``ChatStream``):
:func:`stream_async_pieces` feeds the same queue from a producer task in the
event loop (no thread), with the same consumer, stop and error semantics.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Literal, Optional, Union

log = logging.getLogger(__name__)

Status = Literal["complete", "stopped", "error"]
Source = Union[Iterable[str], Callable[[], Iterable[str]]]
Sink = Callable[[str], Awaitable[Any]]

# Queue item kinds (the producer → consumer protocol).
_PIECE = "piece"
_END = "end"
_ERROR = "error"
_CANCEL = "cancel"


@dataclass
class StreamResult:
    """What came out of one streamed generation.

    Attributes:
        text: every piece handed to the sink, concatenated (the partial text
            when stopped or failed).
        status: ``"complete"`` (the iterator ended by itself), ``"stopped"``
            (the cancel event was set, or the consuming task was cancelled) or
            ``"error"`` (the iterator or the sink raised).
        pieces: how many pieces were handed to the sink.
        error: the producer's (or the sink's) exception when ``status == "error"``.
        sink_failed: True when ``error`` came from the sink, not the producer.
        task_cancelled: True when the *consuming task* was cancelled; the
            caller should finish its bookkeeping and re-raise
            ``asyncio.CancelledError``.
        source: the iterable the producer iterated (e.g. the model's generator,
            whose ``finish_reason``/``notice`` can be read afterwards); None if
            creating it failed.
        producer: the producer thread (it may still be finishing its current
            piece right after a stop; join it if you need it gone).
    """

    text: str = ""
    status: Status = "complete"
    pieces: int = 0
    error: Optional[BaseException] = None
    sink_failed: bool = False
    task_cancelled: bool = False
    source: Optional[Iterable[str]] = None
    producer: Optional[threading.Thread] = field(default=None, repr=False)


@dataclass
class StreamHandle:
    """Shared between the consumer and whoever may stop it (``@cl.on_stop``).

    ``cancel_event`` is the event the producer (and the model) watches.
    """

    cancel_event: threading.Event = field(default_factory=threading.Event)
    _wake: Optional[Callable[[], None]] = field(default=None, repr=False)

    def cancel(self) -> None:
        """Stop the stream (idempotent, callable from any thread).

        The consumer returns at once with the text so far; the producer stops
        at its next piece (the model also watches the event between tokens).
        """
        self.cancel_event.set()
        wake = self._wake
        if wake is not None:
            wake()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


def _close_quietly(it: Any) -> None:
    close = getattr(it, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # pragma: no cover - best effort cleanup
            log.debug("closing the source iterator failed", exc_info=True)


def _produce(
    source: Source,
    cancel: threading.Event,
    emit: Callable[[tuple[str, Any]], None],
    holder: list,
) -> None:
    """Producer thread body: iterate ``source`` and emit queue items until done."""
    iterator = None
    try:
        iterable = source() if callable(source) else source
        holder.append(iterable)
        iterator = iter(iterable)
        for piece in iterator:
            if cancel.is_set():
                break
            if piece:
                emit((_PIECE, piece))
        emit((_END, None))
    except BaseException as exc:  # report everything; the thread must not die silently
        emit((_ERROR, exc))
    finally:
        if iterator is not None and cancel.is_set():
            _close_quietly(iterator)


async def stream_pieces(
    source: Source,
    sink: Sink,
    handle: Optional[StreamHandle] = None,
    *,
    thread_name: str = "argus-stream",
) -> StreamResult:
    """Run ``source`` in a producer thread and feed its pieces to ``sink`` in order.

    Args:
        source: a blocking iterable of ``str`` pieces, or a zero-argument callable
            returning one (called *in the producer thread*, so any blocking set-up
            such as prompt processing also stays off the event loop).
        sink: ``async`` callable awaited once per non-empty piece, in order.
        handle: cancel handle; a fresh one is made if omitted. Setting its event
            (from any thread) stops the stream promptly: the consumer returns at
            once with the text so far and the producer stops at its next piece.

    Returns:
        A :class:`StreamResult`. Producer and sink errors are returned
        (``status="error"``; a sink error also sets the cancel event so the
        producer stops, and ``sink_failed``), not raised. If the calling task
        is cancelled, the cancellation is absorbed and reported as
        ``status="stopped", task_cancelled=True``.
    """
    handle = handle or StreamHandle()
    cancel = handle.cancel_event
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    holder: list = []

    def emit(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # loop closed: nobody is listening any more
            cancel.set()

    def wake() -> None:  # lets handle.cancel() interrupt a wait for the next piece
        emit((_CANCEL, None))

    handle._wake = wake
    result = StreamResult()
    result.producer = threading.Thread(
        target=_produce, args=(source, cancel, emit, holder), name=thread_name, daemon=True
    )
    result.producer.start()
    try:
        await _consume(queue, sink, cancel, result)
    finally:
        handle._wake = None
        result.source = holder[0] if holder else None
    return result


async def _consume(
    queue: "asyncio.Queue[tuple[str, Any]]", sink: Sink, cancel: threading.Event, result: StreamResult
) -> None:
    """The consumer side shared by both producers: hand pieces to ``sink`` until the end, an
    error or a stop, filling in ``result``. Absorbs the calling task's cancellation (see
    :func:`stream_pieces`)."""
    try:
        while not cancel.is_set():
            kind, value = await queue.get()
            if cancel.is_set() or kind == _CANCEL:
                break
            if kind == _PIECE:
                result.text += value
                result.pieces += 1
                try:
                    await sink(value)
                except Exception as exc:  # the consumer side broke: stop the producer, keep the text
                    cancel.set()
                    result.status = "error"
                    result.error = exc
                    result.sink_failed = True
                    log.debug("stream sink failed: %r", exc)
                    break
            elif kind == _END:
                break
            else:  # _ERROR
                result.status = "error"
                result.error = value
                log.debug("stream producer failed: %r", value)
                break
        if cancel.is_set() and result.status != "error":
            result.status = "stopped"
    except asyncio.CancelledError:
        cancel.set()
        result.status = "stopped"
        result.task_cancelled = True


async def stream_async_pieces(
    source: AsyncIterator[str],
    sink: Sink,
    handle: Optional[StreamHandle] = None,
) -> StreamResult:
    """Like :func:`stream_pieces` for an *async* iterator (a provider's ``ChatStream``): a
    producer task in this event loop feeds the same queue, no thread is needed.

    Stopping (the handle, or cancellation of the calling task) cancels the producer task
    and closes ``source`` (its ``aclose()``, which ends the HTTP request); the text so far
    is kept. A producer exception becomes ``status="error"`` with it in ``error`` (the
    pieces already handed out stay in ``text``). ``result.source`` is ``source``;
    ``result.producer`` is None.
    """
    handle = handle or StreamHandle()
    cancel = handle.cancel_event
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def produce() -> None:
        try:
            async for piece in source:
                if cancel.is_set():
                    break
                if piece:
                    queue.put_nowait((_PIECE, piece))
            queue.put_nowait((_END, None))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # reported to the consumer; never escapes the task
            queue.put_nowait((_ERROR, exc))

    def wake() -> None:  # handle.cancel() may come from any thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (_CANCEL, None))
        except RuntimeError:
            pass

    handle._wake = wake
    result = StreamResult(source=source)
    task = asyncio.ensure_future(produce())
    try:
        await _consume(queue, sink, cancel, result)
    finally:
        handle._wake = None
        if not task.done():
            task.cancel()
        try:
            await asyncio.shield(_close_source(task, source))
        except asyncio.CancelledError:  # cancelled again while closing: the close goes on by itself
            result.task_cancelled = True
    return result


async def _close_source(task: "asyncio.Future[None]", source: Any) -> None:
    """Wait for the producer task to end, then close ``source`` (best effort)."""
    try:
        await task
    except BaseException:  # its own cancellation, or an error already reported
        pass
    close = getattr(source, "aclose", None)
    if callable(close):
        try:
            await close()
        except Exception:  # pragma: no cover - a broken stream may fail to close; it is gone either way
            log.debug("closing the async source failed", exc_info=True)
