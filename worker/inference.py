"""Running one model over a network, on the admin: the stages of the chain, batched decode,
and pipelined generation.

Routing is client-orchestrated (as in Petals): the admin daemon sends every
stage its ``forward`` over the member link that stage's worker keeps open to
the admin, and gets ``forward_result`` back on the same link; the admin's own
stage (it holds the token embedding, first in chain order) runs in-process.
A token's trip therefore costs one request/response per remote stage; the
alternative, stage-to-stage (as in exo), would save half a round trip per
hop but needs worker-to-worker links and a return path for the logits. On
loopback one hop of a [1, 576] f32 hidden state measures ~0.3 ms against a
decode step of ~30 ms (docs/PERFORMANCE.md), so the simpler routing was kept.

What a worker learns: only the stage whose block range is first (the admin's
own, which holds the token embedding) is sent token ids. Every other stage
gets hidden states, positions and, per position, a *prefix digest*: a keyed
hash chain of the session's tokens up to that position
(``prefix_digests``: HMAC-SHA-256 under a key derived from the admin's own
network key, which never leaves the admin, seeded with the session id, cut to
128 bits). Its paged KV cache records the digests instead of tokens, so that
``session_query`` (which carries digests too) still finds how much of a
continued conversation it holds, without the worker learning the text or
being able to test guesses of it (it lacks the key), and without two sessions
with the same prefix looking alike (the session id seeds the chain).

Pieces, smallest first:

- ``prefix_digests``: the digest chain of a token sequence.

- ``LocalStage`` / ``RemoteStage``: one stage of the chain behind one
  interface (``forward``, ``session_query``, ``session_save``,
  ``session_drop``, ``sessions``).
- ``Chain``: the stages in order; ``forward(rows, ids)`` runs a batch through all.
- ``DecodeBatcher``: gathers the decode steps of concurrent sessions into one
  ``forward`` with one row per session (B gemv become one gemm per stage).
- ``NetworkModel``: the model file the network runs (path, tokenizer, SHA-256).
- ``NetworkInference``: per admin network; ``generate`` (prefill from the cached
  prefix, decode with the engine's ``Decoder``, streaming, save after the answer)
  and the KV sessions commands. Which stages exist comes from a ``StageSource``
  (``worker.distribution.Distribution``: the placement and who holds its blocks).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import struct
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional, Protocol, Sequence

import numpy as np

from worker import protocol
from worker.engine import Decoder, ModelFile, SamplingParams, default_model_path
from worker.engine.block_range import BlockRange
from worker.engine.shardfile import model_sha256
from worker.engine.tokenizer import Tokenizer
from worker.link import LinkClosed
from worker.network_state import MemberLive, Network, NetworkUnavailable
from worker.protocol import InternalError, Message, NotFound
from worker.protocol.messages import PREFIX_DIGEST_BYTES

if TYPE_CHECKING:  # pragma: no cover
    from worker.stage_host import StageHost

log = logging.getLogger(__name__)

#: Prompt tokens per prefill forward (see worker/engine/model.py PREFILL_CHUNK).
PREFILL_CHUNK = 256
#: Seconds a stage may take to answer one request before the answer fails.
STAGE_TIMEOUT_S = 120.0
#: Seconds the batcher waits for the other decoding sessions to join a step.
BATCH_WINDOW_S = 0.003
#: Domain label of the digest chain's seed (the chain's first state).
PREFIX_SEED_LABEL = b"argus-prefix-digest-seed-v1\x00"


# --------------------------------------------------------------------------- prefix digests


def prefix_digests(key: bytes, session_id: str, token_ids: Sequence[int],
                   state: Optional[bytes] = None) -> tuple[list[bytes], bytes]:
    """The prefix digests of ``token_ids`` in ``session_id``: (digests, state).

    ``state_0 = HMAC-SHA-256(key, label || session_id)``, ``state_{p+1} = HMAC-SHA-256(key,
    state_p || token_p as u32 big-endian)``; position p's digest is ``state_{p+1}[:16]``
    (``protocol.PREFIX_DIGEST_BYTES``), so equal digests at p mean equal prefixes 0..p of
    the same session. ``state``: continue a chain (the second value of an earlier call)
    instead of starting at the session's seed. Returns one 16-byte digest per token and
    the chain's last state (32 bytes). ~1 µs per token.
    """
    if state is None:
        state = hmac.digest(key, PREFIX_SEED_LABEL + session_id.encode("utf-8"), "sha256")
    out = []
    pack = struct.Struct(">I").pack
    for t in token_ids:
        state = hmac.digest(key, state + pack(int(t)), "sha256")
        out.append(state[:PREFIX_DIGEST_BYTES])
    return out, state


# --------------------------------------------------------------------------- stages


class LocalStage:
    """The admin's own stage, run in-process by its StageHost."""

    def __init__(self, node_id: str, host: "StageHost"):
        self.node_id, self.host = node_id, host

    @property
    def block_range(self) -> Optional[BlockRange]:
        return self.host.block_range

    async def forward(self, rows: list[dict], x: np.ndarray) -> np.ndarray:
        return await self.host.forward(rows, x)

    async def session_query(self, session_id: str, digests: Sequence[bytes]) -> int:
        """How many leading positions of the prefix whose digests are ``digests`` this stage holds."""
        cached, _ = await self.host.session_query(session_id, list(digests))
        return cached

    async def session_save(self, session_id: str) -> bool:
        return await self.host.session_save(session_id)

    async def session_drop(self, session_id: str) -> bool:
        return await self.host.session_drop(session_id)

    async def sessions(self) -> list[dict]:
        return await self.host.sessions()


class RemoteStage:
    """A worker's stage, reached over the member link it keeps open to the admin.

    Replies are matched by request id (``MemberLive.waiters``, filled by the
    admin's member loop). Raises NetworkUnavailable when the worker is not connected
    or disconnects before answering, ProtocolError subclasses for its error replies.
    """

    def __init__(self, node_id: str, block_range: BlockRange, live: MemberLive, timeout_s: float = STAGE_TIMEOUT_S):
        self.node_id, self.block_range, self.live, self.timeout_s = node_id, block_range, live, timeout_s

    async def request(self, message_type: str, payload: Optional[dict] = None, *, session_id: Optional[str] = None,
                      tensor: Optional[np.ndarray] = None, timeout_s: Optional[float] = None) -> Message:
        link = self.live.link
        if link is None:
            raise NetworkUnavailable(f"worker {self.node_id} is not connected")
        m = protocol.make_message(message_type, payload, network_id=link.network_id, session_id=session_id)
        fut = asyncio.get_running_loop().create_future()
        self.live.waiters[m.request_id] = fut
        try:
            try:
                await link.send(m, tensor)
            except LinkClosed:
                raise NetworkUnavailable(f"worker {self.node_id} disconnected") from None
            try:
                answer = await asyncio.wait_for(fut, timeout_s or self.timeout_s)
            except asyncio.TimeoutError:
                raise NetworkUnavailable(f"worker {self.node_id} did not answer within {timeout_s or self.timeout_s:g} s") from None
        finally:
            self.live.waiters.pop(m.request_id, None)
        if answer.message_type == "error":
            raise protocol.error_from_reply(answer)
        return answer

    async def forward(self, rows: list[dict], x: np.ndarray) -> np.ndarray:
        sid = rows[0]["session_id"] if len(rows) == 1 else f"batch-{len(rows)}"
        m = await self.request("forward", {"block_range": protocol.block_range_to_wire(self.block_range), "rows": rows},
                               session_id=sid, tensor=x)
        if m.message_type != "forward_result" or m.tensor is None:
            raise InternalError(f"worker {self.node_id} answered forward with {m.message_type}")
        return m.tensor.array

    async def session_query(self, session_id: str, digests: Sequence[bytes]) -> int:
        """How many leading positions of the prefix whose digests are ``digests`` the worker holds."""
        m = await self.request("session_query", {"prefix_digests": protocol.b64(b"".join(digests))},
                               session_id=session_id)
        return int(m.payload["cached_tokens"])

    async def session_save(self, session_id: str) -> bool:
        return bool((await self.request("session_save", session_id=session_id)).payload["saved"])

    async def session_drop(self, session_id: str) -> bool:
        m = await self.request("session_drop", session_id=session_id)
        return bool(m.payload["saved"])  # for session_drop: whether this stage held the session

    async def sessions(self) -> list[dict]:
        return list((await self.request("sessions_request")).payload["sessions"])


class Chain:
    """Stages in chain order; ``forward`` runs a batch of rows through all of them."""

    def __init__(self, stages: Sequence[Any]):
        self.stages = list(stages)

    async def forward(self, rows: list[dict], ids: np.ndarray) -> np.ndarray:
        """rows: FORWARD_ROWS items with their token ids and prefix digests; ids: [N] int32 (rows'
        token ids concatenated) -> logits [B, vocab] f32, one row per input row (its last position).

        Only the stage whose range is first gets the rows' ``token_ids``; the others get the
        rows with ``token_ids`` null (hidden states, positions and prefix digests only)."""
        x: np.ndarray = ids
        blind = [{**r, "token_ids": None} for r in rows]
        for s in self.stages:
            r = s.block_range
            x = await s.forward(rows if r is not None and r.is_first else blind, x)
        return x


class DecodeBatcher:
    """Gathers one decode step from each concurrent session into a single chain pass.

    ``step(session_id, pos, token, digest)`` -> that session's logits [vocab] f32
    (``digest``: the prefix digest of the position, see ``prefix_digests``). A pass
    starts when every session registered as decoding has asked, or after
    ``window_s``; rows run in arrival order (at most MAX_FORWARD_ROWS per pass).
    """

    def __init__(self, run: Callable[[list[dict], np.ndarray], Awaitable[np.ndarray]], window_s: float = BATCH_WINDOW_S):
        self.run, self.window_s = run, window_s
        self.decoding = 0  # sessions between prefill and their last token
        self._queue: list[tuple[dict, asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self.passes = 0  # chain passes run (for tests and the benchmark)
        self.rows = 0  # rows run

    async def step(self, session_id: str, pos: int, token: int, digest: bytes) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(({"session_id": session_id, "start_pos": pos, "n_tokens": 1, "token_ids": [int(token)],
                             "prefix_digests": protocol.b64(digest)}, fut))
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="decode-batcher")
        return await fut

    async def _drain(self) -> None:
        while self._queue:
            deadline = time.monotonic() + self.window_s
            while len(self._queue) < max(1, self.decoding) and time.monotonic() < deadline:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
            batch = self._queue[:protocol.MAX_FORWARD_ROWS]
            del self._queue[:len(batch)]
            rows = [r for r, _ in batch]
            ids = np.asarray([r["token_ids"][0] for r in rows], dtype=np.int32)
            try:
                logits = await self.run(rows, ids)
            except BaseException as e:  # every waiter learns why; the batcher itself goes on
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e if isinstance(e, Exception) else NetworkUnavailable("cancelled"))
                if not isinstance(e, Exception):
                    raise
                continue
            self.passes += 1
            self.rows += len(rows)
            for i, (_, fut) in enumerate(batch):
                if not fut.done():
                    fut.set_result(logits[i])


# --------------------------------------------------------------------------- the model


class NetworkModel:
    """The model file a network runs, read lazily: ``path`` (default: the packaged model),
    ``file()`` (the parsed GGUF), ``tokenizer()``, ``sha256()`` (hex, of the whole file)."""

    def __init__(self, path: Optional[str] = None):
        self.path = path or default_model_path()
        self._file: Optional[ModelFile] = None
        self._tokenizer: Optional[Tokenizer] = None
        self._sha256: Optional[str] = None

    def file(self) -> ModelFile:
        if self._file is None:
            self._file = ModelFile(self.path)
        return self._file

    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_gguf(self.file().reader)
        return self._tokenizer

    async def sha256(self) -> str:
        """The file's SHA-256 (hex), computed once in a thread."""
        if self._sha256 is None:
            self._sha256 = await asyncio.to_thread(model_sha256, self.path)
        return self._sha256


class StageSource(Protocol):
    """Where the stages of a network come from (``worker.distribution.Distribution``)."""

    local: LocalStage

    def chain(self) -> Chain:
        """Every stage in order, loaded and connected; raises NetworkUnavailable otherwise."""

    def reachable_stages(self) -> list[Any]:
        """The stages that can answer right now (for listing and dropping sessions)."""


# --------------------------------------------------------------------------- generation and sessions


class NetworkInference:
    """Generation and KV sessions for one network this daemon is admin of.

    Args:
        net: the network (its events, its node id).
        model: the model it runs.
        stages: where the chain comes from (the distribution of its blocks).
    """

    def __init__(self, net: Network, model: NetworkModel, stages: StageSource):
        self.net, self.model, self.stages = net, model, stages
        self.batcher = DecodeBatcher(self._run_chain)

    @property
    def prefix_key(self) -> bytes:
        """The key of the sessions' prefix digests: the admin's own stage host's (never sent)."""
        return self.stages.local.host.prefix_key

    async def _run_chain(self, rows: list[dict], ids: np.ndarray) -> np.ndarray:
        return await self.stages.chain().forward(rows, ids)

    # ---- sessions ------------------------------------------------------------
    async def sessions(self) -> dict:
        """The ``sessions_list`` result: every session some reachable stage holds, merged."""
        stages = self.stages.reachable_stages()
        answers = await asyncio.gather(*(s.sessions() for s in stages), return_exceptions=True)
        merged: dict[str, dict] = {}
        for s, ans in zip(stages, answers):
            if isinstance(ans, BaseException):
                continue
            for row in ans:
                e = merged.setdefault(row["session_id"], {"session_id": row["session_id"], "nodes": [], "n_tokens": 0,
                                                          "bytes": 0, "saved_at": None, "in_memory": False})
                e["nodes"].append(s.node_id)
                e["n_tokens"] = max(e["n_tokens"], row["n_tokens"])
                e["bytes"] += row["bytes"]
                if row.get("saved_at"):
                    e["saved_at"] = max(e["saved_at"] or 0, row["saved_at"])
                e["in_memory"] = e["in_memory"] or row["in_memory"]
        return {"sessions": sorted(merged.values(), key=lambda e: -(e["saved_at"] or 0))}

    async def drop_session(self, session_id: str) -> dict:
        """The ``session_drop`` result: how many stages held (and dropped) the session."""
        answers = await asyncio.gather(*(s.session_drop(session_id) for s in self.stages.reachable_stages()),
                                       return_exceptions=True)
        dropped = sum(1 for a in answers if a is True)
        self.net.events.write("session_dropped", network=self.net.network_id, node=self.net.node_id,
                              session=session_id, nodes=dropped)
        return {"dropped": dropped}

    # ---- generation ----------------------------------------------------------
    async def generate(self, session_id: str, input_ids: list[int], max_length: int, sampling: Optional[dict],
                       emit: Callable[[dict], Awaitable[None]], cancel: asyncio.Event) -> dict:
        """Generate a continuation of ``input_ids`` for ``session_id``, calling ``emit`` with
        each ``inference_response`` payload (text pieces, then one with ``done``).

        The prefix the stages already hold for this session (saved or in memory) is not
        recomputed: prefill starts at the smallest cached prefix over all stages
        (``usage.cached_tokens``). After the answer every stage saves the session.
        Returns the usage dict. Raises NetworkUnavailable / ProtocolError subclasses with a
        sentence for the user (the caller sends it as an ``error``).
        """
        chain = self.stages.chain()
        ctx = self.model.file().config.context_length
        if len(input_ids) >= min(max_length, ctx):
            raise protocol.InvalidPayload(f"the prompt has {len(input_ids)} tokens; this model reads at most {ctx} "
                                          f"and max_length is {max_length}")
        try:
            params = SamplingParams.from_wire(sampling, max_tokens=min(max_length, ctx) - len(input_ids))
        except ValueError as e:
            raise protocol.InvalidPayload(f"sampling: {e}") from None
        ignore_eos = bool((sampling or {}).get("ignore_eos"))
        t0 = time.perf_counter()
        key = self.prefix_key
        digests, state = prefix_digests(key, session_id, input_ids)
        cached = min(await asyncio.gather(*(s.session_query(session_id, digests) for s in chain.stages)))
        start = min(cached, len(input_ids) - 1)
        logits = None
        for pos in range(start, len(input_ids), PREFILL_CHUNK):
            ids = input_ids[pos:pos + PREFILL_CHUNK]
            row = {"session_id": session_id, "start_pos": pos, "n_tokens": len(ids), "token_ids": ids,
                   "prefix_digests": protocol.b64(b"".join(digests[pos:pos + len(ids)]))}
            logits = (await chain.forward([row], np.asarray(ids, dtype=np.int32)))[0]
        prefill_ms = (time.perf_counter() - t0) * 1000
        decoder = Decoder(self.model.tokenizer(), params, input_ids, ignore_eos=ignore_eos)
        pos = len(input_ids)
        t1 = time.perf_counter()
        self.batcher.decoding += 1
        try:
            while True:
                if cancel.is_set():
                    decoder.cancel()
                    break
                step = decoder.step(logits)
                if step.token_id is not None:
                    await emit({"token_id": step.token_id, "text": step.text[:4096], "done": False,
                                "finish_reason": None, "usage": None})
                if step.done:
                    break
                (digest,), state = prefix_digests(key, session_id, [step.token_id], state)
                logits = await self.batcher.step(session_id, pos, step.token_id, digest)
                pos += 1
        finally:
            self.batcher.decoding -= 1
        decode_s = time.perf_counter() - t1
        generated = len(decoder.generated_ids)
        await asyncio.gather(*(s.session_save(session_id) for s in chain.stages), return_exceptions=True)
        usage = {"prompt_tokens": len(input_ids), "cached_tokens": start, "completion_tokens": generated,
                 "prefill_ms": round(prefill_ms, 2),
                 # the first token comes from the prefill's logits: generated - 1 decode steps
                 "decode_tokens_s": round((generated - 1) / decode_s, 2) if decode_s > 0 and generated > 1 else 0.0,
                 "stages": len(chain.stages)}
        tail = decoder.flush()
        await emit({"token_id": None, "text": tail[:4096], "done": True, "finish_reason": decoder.finish_reason,
                    "usage": usage})
        return usage


def split_session_id(session_id: str) -> tuple[str, str]:
    """``"<network_id>.<conversation>"`` -> (network_id, conversation). Raises NotFound without a dot."""
    network_id, dot, rest = session_id.partition(".")
    if not dot or not network_id or not rest:
        raise NotFound(f"session id {session_id!r} does not name a network (expected <network_id>.<conversation>)")
    return network_id, rest


__all__ = ["BATCH_WINDOW_S", "Chain", "DecodeBatcher", "LocalStage", "NetworkInference", "NetworkModel",
           "PREFILL_CHUNK", "RemoteStage", "STAGE_TIMEOUT_S", "StageSource", "prefix_digests", "split_session_id"]
