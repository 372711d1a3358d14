"""The producer-thread → asyncio.Queue → sink bridge (argus.streaming), with real threads."""
from __future__ import annotations

import asyncio
import threading
import time


from argus.streaming import StreamHandle, stream_pieces


class SlowSource:
    """A blocking iterator: ``n`` pieces, ``delay`` seconds of *blocking* sleep each.

    Records the thread it ran in and how many pieces it produced, and honours an
    optional cancel event like the model does.
    """

    def __init__(self, n: int, delay: float, cancel: threading.Event | None = None, fail_at: int | None = None):
        self.n, self.delay, self.cancel, self.fail_at = n, delay, cancel, fail_at
        self.produced = 0
        self.thread: threading.Thread | None = None
        self.finish_reason: str | None = None
        self.done = threading.Event()

    def __iter__(self):
        self.thread = threading.current_thread()
        try:
            for i in range(self.n):
                if self.cancel is not None and self.cancel.is_set():
                    self.finish_reason = "cancelled"
                    return
                time.sleep(self.delay)  # blocks: would freeze the loop if run on it
                if self.fail_at is not None and i == self.fail_at:
                    raise RuntimeError("boom in the model")
                self.produced += 1
                yield f"t{i} "
            self.finish_reason = "stop"
        finally:
            self.done.set()


class Collector:
    def __init__(self):
        self.pieces: list[str] = []
        self.threads: set[int] = set()

    async def __call__(self, piece: str) -> None:
        self.threads.add(threading.get_ident())
        self.pieces.append(piece)


async def test_pieces_arrive_in_order_from_another_thread():
    src = SlowSource(50, 0.0)
    sink = Collector()
    result = await stream_pieces(src, sink)
    assert result.status == "complete"
    assert sink.pieces == [f"t{i} " for i in range(50)]
    assert result.text == "".join(sink.pieces)
    assert result.pieces == 50
    assert result.source is src and src.finish_reason == "stop"
    # produced in a worker thread, consumed on the loop's thread
    assert src.thread is not None and src.thread is not threading.main_thread()
    assert sink.threads == {threading.get_ident()}


async def test_factory_is_called_in_the_producer_thread():
    seen: list[threading.Thread] = []

    def make():
        seen.append(threading.current_thread())
        time.sleep(0.2)  # e.g. prompt processing: must not block the loop
        return iter(["a", "", "b"])  # empty pieces are skipped

    sink = Collector()
    result = await stream_pieces(make, sink)
    assert result.status == "complete" and sink.pieces == ["a", "b"]
    assert seen and seen[0] is not threading.current_thread()


async def test_event_loop_stays_responsive_during_slow_generation():
    src = SlowSource(8, 0.05)  # ~0.4 s of blocking work in total
    ticks: list[float] = []

    async def ticker():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    t = asyncio.create_task(ticker())
    start = time.monotonic()
    result = await stream_pieces(src, Collector())
    elapsed = time.monotonic() - start
    t.cancel()
    assert result.status == "complete" and result.pieces == 8
    assert elapsed >= 0.35
    # had the loop been blocked for 0.4 s we'd see ~1 tick and a 0.4 s gap
    assert len(ticks) >= 15
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert max(gaps) < 0.2


async def test_cancel_via_handle_stops_producer_and_keeps_partial_text():
    handle = StreamHandle()
    src = SlowSource(1000, 0.02, cancel=handle.cancel_event)
    sink = Collector()

    async def stop_after_three(piece: str) -> None:
        await sink(piece)
        if len(sink.pieces) == 3:
            # what @cl.on_stop does (from another task in real life)
            asyncio.get_running_loop().call_soon(handle.cancel)

    start = time.monotonic()
    result = await stream_pieces(src, stop_after_three, handle)
    assert time.monotonic() - start < 1.0
    assert result.status == "stopped"
    assert not result.task_cancelled
    assert result.text.startswith("t0 t1 t2 ")
    assert result.text == "".join(sink.pieces)
    assert 3 <= result.pieces <= 4
    # the producer notices promptly and stops; nothing like 1000 pieces
    assert src.done.wait(1.0)
    assert src.produced <= 6
    assert src.finish_reason != "stop"  # stopped early (closed, or saw the event itself)


async def test_cancel_from_another_thread_while_producer_is_busy():
    handle = StreamHandle()
    src = SlowSource(3, 2.0, cancel=handle.cancel_event)  # each piece takes 2 s
    threading.Timer(0.2, handle.cancel).start()
    start = time.monotonic()
    result = await stream_pieces(src, Collector(), handle)
    # the consumer returns right away, it does not wait for the 2 s piece
    assert time.monotonic() - start < 1.0
    assert result.status == "stopped" and result.text == ""


async def test_task_cancellation_sets_event_and_keeps_partial():
    handle = StreamHandle()
    src = SlowSource(1000, 0.02, cancel=handle.cancel_event)
    sink = Collector()
    got_three = asyncio.Event()

    async def slow_sink(piece: str) -> None:
        await sink(piece)
        if len(sink.pieces) >= 3:
            got_three.set()

    task = asyncio.create_task(stream_pieces(src, slow_sink, handle))
    await asyncio.wait_for(got_three.wait(), 5)
    task.cancel()  # what Chainlit does to the on_message task on stop
    result = await asyncio.wait_for(task, 2)  # absorbed: the result comes back
    assert result.status == "stopped" and result.task_cancelled
    assert handle.cancel_event.is_set()
    assert result.text == "".join(sink.pieces) and result.text.startswith("t0 t1 t2 ")
    assert src.done.wait(1.0)
    assert src.produced <= len(sink.pieces) + 3


async def test_producer_exception_becomes_error_result():
    src = SlowSource(10, 0.0, fail_at=4)
    sink = Collector()
    result = await stream_pieces(src, sink)
    assert result.status == "error"
    assert isinstance(result.error, RuntimeError) and "boom" in str(result.error)
    assert result.text == "t0 t1 t2 t3 "  # what was streamed before the failure is kept
    assert sink.pieces == ["t0 ", "t1 ", "t2 ", "t3 "]


async def test_factory_exception_becomes_error_result():
    def make():
        raise ValueError("cannot build the prompt")

    result = await stream_pieces(make, Collector())
    assert result.status == "error" and isinstance(result.error, ValueError)
    assert result.text == "" and result.source is None


async def test_sink_failure_becomes_error_result_and_stops_producer():
    handle = StreamHandle()
    src = SlowSource(1000, 0.01, cancel=handle.cancel_event)
    delivered: list[str] = []

    async def flaky_sink(piece: str) -> None:
        if len(delivered) == 3:
            raise ConnectionError("socket gone")
        delivered.append(piece)

    result = await stream_pieces(src, flaky_sink, handle)  # does not raise
    assert result.status == "error" and result.sink_failed
    assert isinstance(result.error, ConnectionError) and "socket gone" in str(result.error)
    assert not result.task_cancelled
    # the partial text is kept (including the piece the sink choked on), so it can be stored
    assert result.text == "t0 t1 t2 t3 " and delivered == ["t0 ", "t1 ", "t2 "]
    assert result.source is src
    assert handle.cancel_event.is_set()
    assert src.done.wait(1.0)
    assert src.produced <= 7
    assert src.finish_reason != "stop"


async def test_producer_error_is_not_a_sink_failure_and_is_not_logged_here(caplog):
    caplog.set_level("DEBUG", logger="argus.streaming")
    result = await stream_pieces(SlowSource(5, 0.0, fail_at=1), Collector())
    assert result.status == "error" and not result.sink_failed
    # the caller logs the traceback once; the bridge does not log one too
    assert not [r for r in caplog.records if r.exc_info]


async def test_concurrent_streams_do_not_mix():
    a, b = Collector(), Collector()

    def src(tag: str):
        def gen():
            for i in range(20):
                time.sleep(0.002)
                yield f"{tag}{i},"
        return gen

    ra, rb = await asyncio.gather(stream_pieces(src("a"), a), stream_pieces(src("b"), b))
    assert ra.text == "".join(f"a{i}," for i in range(20))
    assert rb.text == "".join(f"b{i}," for i in range(20))
