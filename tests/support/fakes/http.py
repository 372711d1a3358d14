"""The shared machinery of the fake API servers: an aiohttp app on 127.0.0.1, request
recording, and behaviour scripted per API key.

A fake subclasses :class:`FakeApi`, says where the key is (:meth:`FakeApi.key_of`)
and answers in :meth:`FakeApi.handle`. It can run in the test's own event loop
(``await fake.start()`` … ``await fake.stop()``) or, for synchronous tests and
other processes, in a thread of its own (``with fake.running_in_thread(): ...``).
It only ever listens on 127.0.0.1, on a free port.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from aiohttp import web

HOST = "127.0.0.1"


@dataclass
class Recorded:
    """One request the fake received.

    ``headers`` has lower-case names; ``json`` is the parsed body (None when
    not JSON); ``key`` is the API key the request carried (None if none).
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    body: bytes = field(repr=False)
    key: Optional[str] = None


class FakeApi:
    """An HTTP fake of a remote model API.

    Attributes:
        requests: every request received, in order.
        behaviour: API key → behaviour name (what each fake understands is in
            its docstring); keys not listed get :attr:`default`.
        default: the behaviour of unlisted keys (``"ok"``).
        pieces: the text pieces a streamed answer is made of.
        key_prefix: how this API's keys start (so key-shaped strings are realistic).
        slow_s: how long ``"slow"`` waits before answering, in seconds.
        url: ``http://127.0.0.1:PORT`` once started.
    """

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.behaviour: dict[str, str] = {}
        self.default = "ok"
        self.pieces: list[str] = ["Hello", ", ", "world", "!"]
        self.slow_s = 5.0
        self.key_prefix = "key-"
        self.url = ""
        self._runner: Optional[web.AppRunner] = None
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # -- to override --------------------------------------------------------
    def key_of(self, request: web.Request) -> Optional[str]:
        """The API key carried by ``request``."""
        raise NotImplementedError

    async def handle(self, request: web.Request, rec: Recorded, behaviour: str) -> web.StreamResponse:
        """The answer to ``request`` (already recorded as ``rec``) under ``behaviour``."""
        raise NotImplementedError

    # -- helpers for subclasses ---------------------------------------------
    def behaviour_of(self, key: Optional[str]) -> str:
        return self.behaviour.get(key or "", self.default)

    @staticmethod
    def json_response(status: int, body: Any, headers: Optional[dict] = None) -> web.Response:
        return web.Response(
            status=status, text=json.dumps(body), content_type="application/json", headers=headers or {}
        )

    @staticmethod
    async def open_sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    @staticmethod
    async def send_sse(resp: web.StreamResponse, data: Any, event: Optional[str] = None) -> None:
        """One server-sent event: ``event: NAME`` (if given) and ``data: JSON`` lines, then a blank line."""
        text = data if isinstance(data, str) else json.dumps(data)
        head = f"event: {event}\r\n" if event else ""
        await resp.write(f"{head}data: {text}\r\n\r\n".encode())

    @staticmethod
    def drop(request: web.Request) -> None:
        """Cut the connection at once (the client sees a broken response)."""
        transport = request.transport
        if transport is not None:
            transport.abort()

    def key_for(self, behaviour: str) -> str:
        """A fresh API key (shaped like this API's) scripted to get ``behaviour``."""
        key = f"{self.key_prefix}Test{behaviour.capitalize()}{len(self.behaviour):04d}" + "Q7x9" * 6
        self.behaviour[key] = behaviour
        return key

    def find(self, fragment: str) -> list[Recorded]:
        """The recorded requests whose path contains ``fragment``."""
        return [r for r in self.requests if fragment in r.path]

    # -- serving --------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        key = self.key_of(request)
        rec = Recorded(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            json=parsed,
            body=body,
            key=key,
        )
        self.requests.append(rec)
        behaviour = self.behaviour_of(key)
        if behaviour == "slow":
            await asyncio.sleep(self.slow_s)
        return await self.handle(request, rec, behaviour)

    async def start(self) -> str:
        """Serve in the running event loop; returns :attr:`url`."""
        # handler_cancellation: a "slow" handler stops when the client gives up, so
        # stopping the fake never waits for it.
        self._runner = web.AppRunner(
            self.make_app(), handle_signals=False, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{HOST}:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @contextlib.contextmanager
    def running_in_thread(self) -> Iterator[str]:
        """Serve from a thread with its own event loop while the block runs; yields :attr:`url`."""
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start())
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        thread = threading.Thread(target=run, name=f"fake-{type(self).__name__}", daemon=True)
        thread.start()
        if not started.wait(10):
            raise RuntimeError("the fake server did not start within 10 s")
        try:
            yield self.url
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
