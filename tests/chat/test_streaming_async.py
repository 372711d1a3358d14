"""stream_async_pieces: an async source (a provider's ChatStream) through the same queue and
consumer as the local model's thread, with the same stop and error semantics."""
from __future__ import annotations

import asyncio

from argus.streaming import StreamHandle, stream_async_pieces


class Source:
    """An async iterator of pieces that can pause after some of them, or fail; records aclose()."""

    def __init__(self, pieces, *, pause_after=None, fail_after=None):
        self.pieces = list(pieces)
        self.pause_after, self.fail_after = pause_after, fail_after
        self.closed = False
        self.paused = asyncio.Event()
        self._i = 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._i == self.pause_after:
            self.paused.set()
            await asyncio.sleep(3600)
        if self._i == self.fail_after:
            raise RuntimeError("the connection broke")
        if self._i >= len(self.pieces):
            raise StopAsyncIteration
        self._i += 1
        return self.pieces[self._i - 1]

    async def aclose(self):
        self.closed = True


async def test_pieces_reach_the_sink_in_order():
    got = []

    async def sink(p):
        got.append(p)

    src = Source(["a", "", "b", "c"])
    result = await stream_async_pieces(src, sink)
    assert (got, result.text, result.status, result.pieces) == (["a", "b", "c"], "abc", "complete", 3)
    assert result.source is src and result.producer is None


async def test_stop_keeps_the_partial_text_and_closes_the_source():
    handle, got = StreamHandle(), []

    async def sink(p):
        got.append(p)

    src = Source(["Hel", "lo", " world"], pause_after=2)
    task = asyncio.create_task(stream_async_pieces(src, sink, handle))
    await asyncio.wait_for(src.paused.wait(), 5)
    handle.cancel()  # the stop button
    result = await asyncio.wait_for(task, 5)
    assert (result.status, result.text, result.task_cancelled) == ("stopped", "Hello", False)
    assert src.closed


async def test_cancelling_the_consumer_is_absorbed_and_reported():
    async def sink(p):
        pass

    src = Source(["x", "y"], pause_after=1)
    task = asyncio.create_task(stream_async_pieces(src, sink))
    await asyncio.wait_for(src.paused.wait(), 5)
    task.cancel()  # Chainlit cancels the message task on stop
    result = await asyncio.wait_for(task, 5)
    assert (result.status, result.text, result.task_cancelled) == ("stopped", "x", True)
    assert src.closed


async def test_a_failing_source_is_an_error_result_with_the_text_so_far():
    async def sink(p):
        pass

    result = await stream_async_pieces(Source(["one ", "two "], fail_after=2), sink)
    assert (result.status, result.text, result.sink_failed) == ("error", "one two ", False)
    assert isinstance(result.error, RuntimeError)


async def test_a_failing_sink_stops_the_source():
    async def sink(p):
        raise ConnectionError("the socket is gone")

    src = Source(["a", "b"], pause_after=1)
    result = await asyncio.wait_for(stream_async_pieces(src, sink), 5)
    assert (result.status, result.text, result.sink_failed) == ("error", "a", True)
    assert src.closed
