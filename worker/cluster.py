"""The admin's side of running one model over a network: placement, block
distribution, and pipelined generation.

Routing is client-orchestrated (as in Petals): the admin daemon sends every
stage its ``forward`` over the member link that stage's worker keeps open to
the admin, and gets ``forward_result`` back on the same link; the admin's own
stage (it holds the token embedding, first in chain order) runs in-process.
A token's trip therefore costs one request/response per remote stage; the
alternative, stage-to-stage (as in exo), would save half a round trip per
hop but needs worker-to-worker links and a return path for the logits. On
loopback one hop of a [1, 576] f32 hidden state measures ~0.3 ms against a
decode step of ~30 ms (docs/PERFORMANCE.md), so the simpler routing was kept.

Pieces, smallest first:

- ``LocalStage`` / ``RemoteStage``: one stage of the chain behind one
  interface (``forward``, ``session_query``, ``session_save``,
  ``session_drop``, ``sessions``).
- ``Chain``: the stages in order; ``forward(rows, ids)`` runs a batch through all.
- ``DecodeBatcher``: gathers the decode steps of concurrent sessions into one
  ``forward`` with one row per session (B gemv become one gemm per stage).
- ``Cluster``: per admin network; placement commands, the distribution
  driver with progress, and ``generate`` (prefill from the cached prefix,
  decode, sampling, streaming, save after the answer).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional, Sequence

import numpy as np

from worker import protocol
from worker.engine.sampling import Sampler, SamplingParams
from worker.engine.block_range import BlockRange
from worker.link import LinkClosed
from worker.placement import MemberCapacity, ModelShape, Placement, PlacementError, plan
from worker.protocol import Conflict, InternalError, Message, NotFound, ProtocolError

if TYPE_CHECKING:  # pragma: no cover
    from worker.daemon import Daemon, MemberLive, Network
    from worker.stage_host import StageHost

log = logging.getLogger("worker.cluster")

#: Prompt tokens per prefill forward (see worker/engine/model.py PREFILL_CHUNK).
PREFILL_CHUNK = 256
#: Bytes of shard data per blocks_chunk (each is hashed, sent and acknowledged).
CHUNK_BYTES = 1 << 20
#: Seconds a stage may take to answer one request before the answer fails.
STAGE_TIMEOUT_S = 120.0
#: Seconds the batcher waits for the other decoding sessions to join a step.
BATCH_WINDOW_S = 0.003


class ClusterError(Conflict):
    """The network cannot run the model right now (not placed, a worker missing, ...)."""


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

    async def session_query(self, session_id: str, token_ids: Sequence[int]) -> int:
        cached, _ = await self.host.session_query(session_id, list(token_ids))
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
    admin's member loop). Raises ClusterError when the worker is not connected
    or disconnects before answering, ProtocolError subclasses for its error replies.
    """

    def __init__(self, node_id: str, block_range: BlockRange, live: "MemberLive", timeout_s: float = STAGE_TIMEOUT_S):
        self.node_id, self.block_range, self.live, self.timeout_s = node_id, block_range, live, timeout_s

    async def request(self, message_type: str, payload: Optional[dict] = None, *, session_id: Optional[str] = None,
                      tensor: Optional[np.ndarray] = None, timeout_s: Optional[float] = None) -> Message:
        link = self.live.link
        if link is None:
            raise ClusterError(f"worker {self.node_id} is not connected")
        m = protocol.make_message(message_type, payload, network_id=link.network_id, session_id=session_id)
        fut = asyncio.get_running_loop().create_future()
        self.live.waiters[m.request_id] = fut
        try:
            try:
                await link.send(m, tensor)
            except LinkClosed:
                raise ClusterError(f"worker {self.node_id} disconnected") from None
            try:
                answer = await asyncio.wait_for(fut, timeout_s or self.timeout_s)
            except asyncio.TimeoutError:
                raise ClusterError(f"worker {self.node_id} did not answer within {timeout_s or self.timeout_s:g} s") from None
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

    async def session_query(self, session_id: str, token_ids: Sequence[int]) -> int:
        m = await self.request("session_query", {"token_ids": list(token_ids)}, session_id=session_id)
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
        """rows: FORWARD_ROWS items; ids: [N] int32 (rows' token ids concatenated)
        -> logits [B, vocab] f32, one row per input row (its last position)."""
        x: np.ndarray = ids
        for s in self.stages:
            x = await s.forward(rows, x)
        return x


class DecodeBatcher:
    """Gathers one decode step from each concurrent session into a single chain pass.

    ``step(session_id, pos, token)`` -> that session's logits [vocab] f32. A pass
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

    async def step(self, session_id: str, pos: int, token: int) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(({"session_id": session_id, "start_pos": pos, "n_tokens": 1, "token_ids": [int(token)]}, fut))
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
                        fut.set_exception(e if isinstance(e, Exception) else ClusterError("cancelled"))
                if not isinstance(e, Exception):
                    raise
                continue
            self.passes += 1
            self.rows += len(rows)
            for i, (_, fut) in enumerate(batch):
                if not fut.done():
                    fut.set_result(logits[i])


# --------------------------------------------------------------------------- distribution state


@dataclass
class Transfer:
    """Progress of sending one worker its shard (bytes)."""

    node_id: str
    block_range: BlockRange
    state: str = "need"  # local | need | receiving | verified | loaded | failed | offline
    sent_bytes: int = 0
    total_bytes: int = 0
    message: str = ""
    task: Optional[asyncio.Task] = field(default=None, repr=False)

    def to_wire(self) -> dict:
        r = self.block_range
        return {"node_id": self.node_id, "block_range": f"{r.start}-{r.end - 1}", "state": self.state,
                "sent_bytes": self.sent_bytes, "total_bytes": self.total_bytes, "message": self.message}


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# --------------------------------------------------------------------------- the cluster


class Cluster:
    """Placement, distribution and generation for one network this daemon is admin of.

    Args:
        daemon: the owning Daemon (links, config commits, events, model path).
        net: the network (its config holds ``placement`` once applied).
        host: the admin's own StageHost for this network.
    """

    def __init__(self, daemon: "Daemon", net: "Network", host: "StageHost"):
        self.daemon, self.net, self.host = daemon, net, host
        self.local = LocalStage(daemon.node_id, host)
        self.transfers: dict[str, Transfer] = {}
        self.batcher = DecodeBatcher(self._run_chain)
        self.generations: dict[str, asyncio.Event] = {}  # session id -> cancel
        self._shards: dict[tuple[int, int], Any] = {}  # (start, end) -> ShardBuild
        self._model_sha: Optional[str] = None
        self._mf = None
        self._tokenizer = None
        self.proposal: Optional[dict] = None

    # ---- model facts ---------------------------------------------------------
    @property
    def model_path(self) -> str:
        from worker.engine.gguf_file import default_model_path

        return self.daemon.model_path or default_model_path()

    def _model_file(self):
        if self._mf is None:
            from worker.engine.gguf_file import ModelFile

            self._mf = ModelFile(self.model_path)
        return self._mf

    def tokenizer(self):
        if self._tokenizer is None:
            from worker.engine.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_gguf(self._model_file().reader)
        return self._tokenizer

    async def model_sha256(self) -> str:
        if self._model_sha is None:
            from worker.engine.shardfile import model_sha256

            self._model_sha = await asyncio.to_thread(model_sha256, self.model_path)
        return self._model_sha

    @property
    def placement(self) -> Optional[Placement]:
        wire = self.net.config.get("placement")
        return Placement.from_wire(wire) if wire else None

    # ---- placement -----------------------------------------------------------
    def _members_in_chain_order(self) -> list[MemberCapacity]:
        from worker.daemon import OFFLINE_AFTER_HEARTBEATS
        from worker.resources import cached_speed

        members, now = [], time.time()
        config = self.net.config["members"]
        order = sorted(config, key=lambda n: (n != self.daemon.node_id, config[n].get("joined_at") or 0, n))
        for node_id in order:
            m = config[node_id]
            alloc = m.get("allocation") or {}
            if node_id == self.daemon.node_id:
                speed = cached_speed(self.daemon.data_dir)
            else:
                live = self.net.members_live.get(node_id)
                fresh = live is not None and live.link is not None and live.last_seen is not None and \
                    now - live.last_seen < self.daemon.heartbeat_s * OFFLINE_AFTER_HEARTBEATS
                if not fresh or m.get("role") == "backup":
                    continue
                speed = (live.resources or {}).get("speed_tokens_s")
            members.append(MemberCapacity(node_id, int(alloc.get("ram_bytes") or 0),
                                          float(speed) if isinstance(speed, (int, float)) and speed > 0 else None))
        return members

    def _plan(self) -> Placement:
        current = self.placement
        epoch = (current.epoch if current else 0) + 1
        shape = ModelShape.from_model_file(self._model_file())
        try:
            return plan(shape, self._members_in_chain_order(), epoch=epoch)
        except PlacementError as e:
            raise Conflict(str(e)) from None

    def _plan_result(self, p: Placement) -> dict:
        current = self.placement
        same = current is not None and [(a.node_id, a.range) for a in current.assignments] == \
            [(a.node_id, a.range) for a in p.assignments]
        return {"epoch": p.epoch, "current_epoch": current.epoch if current else None, "changes": not same,
                "placement": p.to_wire(), "rows": p.describe(), "notes": list(p.notes)}

    async def cmd_plan(self) -> dict:
        """The plan ``apply`` would write now (nothing changes)."""
        p = await asyncio.to_thread(self._plan)
        return self._plan_result(p)

    async def cmd_apply(self) -> dict:
        """Write a new placement into the signed config (pushed and acknowledged like any
        config change) and start sending every worker its blocks."""
        p = await asyncio.to_thread(self._plan)
        result = self._plan_result(p)
        sha = await self.model_sha256()

        def setter(config: dict) -> None:
            config["placement"] = p.to_wire()
            config["placement_model_sha256"] = sha

        async with self.daemon._lock:
            signed = await self.daemon._commit(self.net, setter, "placement", epoch=p.epoch,
                                               ranges={a.node_id: f"{a.range.start}-{a.range.end - 1}" for a in p.assignments})
        self.proposal = None
        self.daemon.events.write("placement_applied", network=self.net.network_id, node=self.daemon.node_id,
                                 epoch=p.epoch)
        self.start_distribution()
        return {**result, "config_version": signed.version}

    def propose(self, reason: str) -> None:
        """After a join or leave: compute the plan the admin could apply, log it, and keep it
        for ``distribution_status`` (never applied without the admin)."""
        try:
            p = self._plan()
        except (Conflict, Exception) as e:  # a plan that cannot be made is still worth saying
            self.proposal = {"reason": reason, "error": str(e)}
            return
        res = self._plan_result(p)
        if res["changes"]:
            self.proposal = {"reason": reason, "rows": res["rows"]}
            self.daemon.events.write("placement_proposed", network=self.net.network_id, node=self.daemon.node_id,
                                     reason=reason, epoch=p.epoch)

    # ---- distribution --------------------------------------------------------
    def start_distribution(self) -> None:
        """(Re)start loading the admin's own range and sending each worker its shard."""
        p = self.placement
        if p is None:
            return
        for t in self.transfers.values():
            if t.task is not None:
                t.task.cancel()
        self.transfers = {}
        for a in p.assignments:
            t = Transfer(a.node_id, a.range)
            self.transfers[a.node_id] = t
            coro = self._load_local(t) if a.node_id == self.daemon.node_id else self._send_shard(t, p.epoch)
            t.task = self.daemon._spawn(coro, f"blocks-{a.node_id}")

    def member_connected(self, node_id: str) -> None:
        """A worker (re)connected: make sure it holds and has loaded its range."""
        p = self.placement
        t = self.transfers.get(node_id)
        if p is None or p.range_of(node_id) is None:
            return
        if t is None or t.task is None or t.task.done():
            t = self.transfers[node_id] = Transfer(node_id, p.range_of(node_id))
            t.task = self.daemon._spawn(self._send_shard(t, p.epoch), f"blocks-{node_id}")

    async def _load_local(self, t: Transfer) -> None:
        t.state, t.message = "receiving", "loading from the model file"
        try:
            if self.host.block_range != t.block_range:
                await self.host.load_from_model(self.model_path, t.block_range)
            t.state, t.message = "loaded", "holds the model file"
            t.total_bytes = t.sent_bytes = 0
        except Exception as e:
            t.state, t.message = "failed", f"could not load blocks {t.block_range.start}-{t.block_range.end - 1}: {e}"
            log.error("network %s: %s", self.net.network_id, t.message)

    async def _shard(self, r: BlockRange):
        key = (r.start, r.end)
        if key not in self._shards:
            from worker.engine.shardfile import build_shard

            self._shards = {k: v for k, v in self._shards.items() if k in {(a.range.start, a.range.end)
                                                                         for a in (self.placement.assignments if self.placement else ())}}
            self._shards[key] = await asyncio.to_thread(build_shard, self.model_path, r)
        return self._shards[key]

    async def _send_shard(self, t: Transfer, epoch: int) -> None:
        """Offer the worker its shard and send what it lacks, chunk by chunk; retry while the
        placement stays the same (the worker may be offline or restart mid-way)."""
        backoff = 1.0
        while True:
            live = self.net.members_live.get(t.node_id)
            if live is None or live.link is None:
                t.state, t.message = "offline", "waiting for the worker to connect"
                await asyncio.sleep(0.5)
                continue
            try:
                await self._transfer_once(t, epoch, RemoteStage(t.node_id, t.block_range, live))
                return
            except asyncio.CancelledError:
                raise
            except (ProtocolError, ClusterError, OSError) as e:
                t.message = str(e)
                if isinstance(e, ProtocolError) and not isinstance(e, ClusterError) and e.code in ("invalid_payload", "not_authorized"):
                    t.state = "failed"
                    log.error("network %s: sending blocks to %s failed: %s", self.net.network_id, t.node_id, e)
                    return
                log.info("network %s: blocks for %s interrupted (%s); retrying", self.net.network_id, t.node_id, e)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _transfer_once(self, t: Transfer, epoch: int, stage: RemoteStage) -> None:
        from tqdm import tqdm

        shard = await self._shard(t.block_range)
        t.total_bytes = len(shard.data)
        offer = {"epoch": epoch, "model_sha256": shard.model_sha256,
                 "block_range": protocol.block_range_to_wire(t.block_range), "shard_sha256": shard.sha256,
                 "shard_bytes": len(shard.data), "chunk_bytes": CHUNK_BYTES}
        status = (await stage.request("blocks_offer", offer)).payload
        have = status["have_bytes"]
        t.state, t.sent_bytes, t.message = status["state"], have, status["message"]
        if status["state"] == "loaded":
            self.daemon.events.write("blocks_present", network=self.net.network_id, node=t.node_id,
                                     shard=shard.sha256[:16])
            return
        if status["state"] == "failed":
            raise ClusterError(f"worker {t.node_id} refused the blocks: {status['message']}")
        self.daemon.events.write("blocks_sending", network=self.net.network_id, node=t.node_id,
                                 shard=shard.sha256[:16], offset=have, total=len(shard.data))
        view = memoryview(shard.data)
        with tqdm(total=len(shard.data), initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"blocks → {t.node_id}", leave=False, disable=None) as bar:
            while have < len(shard.data):
                chunk = view[have:have + CHUNK_BYTES]
                payload = {"shard_sha256": shard.sha256, "offset": have, "sha256": hashlib.sha256(chunk).hexdigest()}
                m = await stage.request("blocks_chunk", payload, session_id=f"blocks-{epoch}",
                                        tensor=np.frombuffer(chunk, dtype=np.uint8))
                status = m.payload
                if status["state"] == "failed":
                    raise ClusterError(f"worker {t.node_id} refused a chunk: {status['message']}")
                bar.update(status["have_bytes"] - have)
                have = status["have_bytes"]
                t.state, t.sent_bytes, t.message = status["state"], have, status["message"]
                if status["state"] in ("verified", "loaded"):
                    break
        if t.state != "loaded":
            raise ClusterError(f"worker {t.node_id} holds the blocks but did not load them: {t.message}")
        self.daemon.events.write("blocks_loaded", network=self.net.network_id, node=t.node_id,
                                 shard=shard.sha256[:16], bytes=len(shard.data))
        log.info("network %s: %s holds blocks %d-%d (%s)", self.net.network_id, t.node_id, t.block_range.start,
                 t.block_range.end - 1, _mib(len(shard.data)))

    def cmd_status(self) -> dict:
        p = self.placement
        workers = [t.to_wire() for t in self.transfers.values()]
        for w in workers:
            live = self.net.members_live.get(w["node_id"])
            if w["node_id"] != self.daemon.node_id and (live is None or live.link is None) and w["state"] == "loaded":
                w["state"], w["message"] = "offline", "the worker is not connected"
        ready = p is not None and bool(workers) and all(w["state"] == "loaded" for w in workers) and \
            len(workers) == len(p.assignments)
        return {"epoch": p.epoch if p else None, "ready": ready, "workers": workers, "proposal": self.proposal,
                "decode_passes": self.batcher.passes, "decode_rows": self.batcher.rows}

    # ---- the chain -----------------------------------------------------------
    def chain(self) -> Chain:
        """The stages in order, each loaded and connected. Raises ClusterError saying what is missing."""
        p = self.placement
        if p is None:
            raise ClusterError(f"network {self.net.config['name']} has no placement yet; an admin runs /workers rebalance")
        stages = []
        for a in p.assignments:
            t = self.transfers.get(a.node_id)
            if a.node_id == self.daemon.node_id:
                if self.host.block_range != a.range:
                    raise ClusterError("the admin's own blocks are still loading; try again in a moment")
                stages.append(self.local)
                continue
            live = self.net.members_live.get(a.node_id)
            if live is None or live.link is None:
                raise ClusterError(f"worker {a.node_id} (blocks {a.range.start}-{a.range.end - 1}) is offline; "
                                   "start it again or run /workers rebalance without it")
            if t is None or t.state != "loaded":
                state = t.state if t else "not started"
                raise ClusterError(f"worker {a.node_id} is still receiving its blocks ({state}); see /workers rebalance")
            stages.append(RemoteStage(a.node_id, a.range, live))
        return Chain(stages)

    async def _run_chain(self, rows: list[dict], ids: np.ndarray) -> np.ndarray:
        return await self.chain().forward(rows, ids)

    # ---- sessions ------------------------------------------------------------
    async def cmd_sessions(self) -> dict:
        stages = self._stages_reachable()
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

    async def cmd_session_drop(self, session_id: str) -> dict:
        answers = await asyncio.gather(*(s.session_drop(session_id) for s in self._stages_reachable()),
                                       return_exceptions=True)
        dropped = sum(1 for a in answers if a is True)
        self.daemon.events.write("session_dropped", network=self.net.network_id, node=self.daemon.node_id,
                                 session=session_id, nodes=dropped)
        return {"dropped": dropped}

    def _stages_reachable(self) -> list[Any]:
        stages: list[Any] = [self.local] if self.host.block_range is not None else []
        p = self.placement
        for a in (p.assignments if p else ()):
            live = self.net.members_live.get(a.node_id)
            if a.node_id != self.daemon.node_id and live is not None and live.link is not None:
                stages.append(RemoteStage(a.node_id, a.range, live, timeout_s=10.0))
        return stages

    # ---- generation ----------------------------------------------------------
    async def generate(self, session_id: str, input_ids: list[int], max_length: int, sampling: Optional[dict],
                       emit: Callable[[dict], Awaitable[None]], cancel: asyncio.Event) -> dict:
        """Generate a continuation of ``input_ids`` for ``session_id``, calling ``emit`` with
        each ``inference_response`` payload (text pieces, then one with ``done``).

        The prefix the stages already hold for this session (saved or in memory) is not
        recomputed: prefill starts at the smallest cached prefix over all stages
        (``usage.cached_tokens``). After the answer every stage saves the session.
        Returns the usage dict. Raises ClusterError / ProtocolError subclasses with a
        sentence for the user (the caller sends it as an ``error``).
        """
        chain = self.chain()
        tok = self.tokenizer()
        ctx = self._model_file().config.context_length
        if len(input_ids) >= min(max_length, ctx):
            raise protocol.InvalidPayload(f"the prompt has {len(input_ids)} tokens; this model reads at most {ctx} "
                                          f"and max_length is {max_length}")
        params = _sampling_params(sampling, max_tokens=min(max_length, ctx) - len(input_ids))
        ignore_eos = bool((sampling or {}).get("ignore_eos"))
        t0 = time.perf_counter()
        cached = min(await asyncio.gather(*(s.session_query(session_id, input_ids) for s in chain.stages)))
        start = min(cached, len(input_ids) - 1)
        logits = None
        for pos in range(start, len(input_ids), PREFILL_CHUNK):
            ids = input_ids[pos:pos + PREFILL_CHUNK]
            row = {"session_id": session_id, "start_pos": pos, "n_tokens": len(ids), "token_ids": ids}
            logits = (await chain.forward([row], np.asarray(ids, dtype=np.int32)))[0]
        prefill_ms = (time.perf_counter() - t0) * 1000
        sampler, decoder = Sampler(params), tok.stream_decoder()
        history, generated, pos = list(input_ids), 0, len(input_ids)
        finish = "length"
        t1 = time.perf_counter()
        self.batcher.decoding += 1
        try:
            while True:
                if cancel.is_set():
                    finish = "cancelled"
                    break
                token = sampler(logits, history)
                if token in tok.stop_ids and not ignore_eos:
                    finish = "stop"
                    break
                generated += 1
                history.append(token)
                piece = decoder.push(token)
                await emit({"token_id": token, "text": piece[:4096], "done": False, "finish_reason": None, "usage": None})
                if generated >= params.max_tokens:
                    break
                logits = await self.batcher.step(session_id, pos, token)
                pos += 1
        finally:
            self.batcher.decoding -= 1
        decode_s = time.perf_counter() - t1
        await asyncio.gather(*(s.session_save(session_id) for s in chain.stages), return_exceptions=True)
        usage = {"prompt_tokens": len(input_ids), "cached_tokens": start, "completion_tokens": generated,
                 "prefill_ms": round(prefill_ms, 2),
                 # the first token comes from the prefill's logits: generated - 1 decode steps
                 "decode_tokens_s": round((generated - 1) / decode_s, 2) if decode_s > 0 and generated > 1 else 0.0,
                 "stages": len(chain.stages)}
        tail = decoder.flush()
        await emit({"token_id": None, "text": tail[:4096], "done": True, "finish_reason": finish, "usage": usage})
        return usage


def _sampling_params(sampling: Optional[dict], max_tokens: int) -> SamplingParams:
    """protocol SAMPLING_FIELDS (nulls = defaults; no record = greedy) -> SamplingParams."""
    s = sampling or {}
    temperature = s.get("temperature")
    if temperature is None:
        temperature = 0.0 if sampling is None else SamplingParams.temperature
    greedy = temperature == 0.0
    try:
        return SamplingParams(
            temperature=float(temperature),
            top_k=int(s["top_k"]) if s.get("top_k") is not None else (0 if greedy else SamplingParams.top_k),
            top_p=float(s["top_p"]) if s.get("top_p") is not None else (1.0 if greedy else SamplingParams.top_p),
            repetition_penalty=float(s["repetition_penalty"]) if s.get("repetition_penalty") is not None
            else (1.0 if greedy else SamplingParams.repetition_penalty),
            max_tokens=max(1, max_tokens), seed=s.get("seed"))
    except ValueError as e:
        raise protocol.InvalidPayload(f"sampling: {e}") from None


def split_session_id(session_id: str) -> tuple[str, str]:
    """``"<network_id>.<conversation>"`` -> (network_id, conversation). Raises NotFound without a dot."""
    network_id, dot, rest = session_id.partition(".")
    if not dot or not network_id or not rest:
        raise NotFound(f"session id {session_id!r} does not name a network (expected <network_id>.<conversation>)")
    return network_id, rest


__all__ = ["CHUNK_BYTES", "Chain", "Cluster", "ClusterError", "DecodeBatcher", "LocalStage", "RemoteStage",
           "Transfer", "split_session_id"]
