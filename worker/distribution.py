"""Placing a model's blocks on a network's members and sending each worker its shard file,
on the admin.

``Distribution`` (one per admin network) turns the members' allocations and speeds into a
placement (``worker/placement.py``), writes it into the signed config when the admin
applies it, then loads the admin's own block range from the model file and sends every
worker the shard file of its range (``worker/engine/shardfile.py``) in CHUNK_BYTES
chunks over its member link, resuming where the worker's block store
(``worker/blocks.py``) stopped. ``Transfer`` is one worker's progress. Once every range
is loaded, ``chain()`` gives the stages in order for ``worker/inference.py``.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from tqdm import tqdm

from worker import protocol
from worker.engine.block_range import BlockRange
from worker.engine.shardfile import ShardBuild, build_shard
from worker.inference import Chain, LocalStage, NetworkModel, RemoteStage
from worker.network_state import Network, NetworkUnavailable
from worker.placement import MemberCapacity, ModelShape, Placement, PlacementError
from worker.placement import plan as plan_placement
from worker.protocol import Conflict, ProtocolError
from worker.protocol.units import format_mib
from worker.resources import cached_speed

if TYPE_CHECKING:  # pragma: no cover
    from worker.stage_host import StageHost

log = logging.getLogger(__name__)

#: Bytes of shard file per blocks_chunk (each is hashed, sent and acknowledged).
CHUNK_BYTES = 1 << 20


@dataclass
class Transfer:
    """Progress of sending one worker the shard file of its block range (bytes)."""

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


class Distribution:
    """Placement and block distribution for one network this daemon is admin of.

    Args:
        net: the network (its config holds ``placement`` once applied).
        model: the model file it runs.
        host: the admin's own StageHost for this network.
    """

    def __init__(self, net: Network, model: NetworkModel, host: "StageHost"):
        self.net, self.model, self.host = net, model, host
        self.local = LocalStage(net.node_id, host)
        self.transfers: dict[str, Transfer] = {}
        self.proposal: Optional[dict] = None
        self._shard_files: dict[tuple[int, int], ShardBuild] = {}  # (start, end) -> its shard file

    @property
    def placement(self) -> Optional[Placement]:
        wire = self.net.config.get("placement")
        return Placement.from_wire(wire) if wire else None

    # ---- placement -----------------------------------------------------------
    def _members_in_chain_order(self) -> list[MemberCapacity]:
        members, now = [], time.time()
        config = self.net.config["members"]
        order = sorted(config, key=lambda n: (n != self.net.node_id, config[n].get("joined_at") or 0, n))
        for node_id in order:
            m = config[node_id]
            alloc = m.get("allocation") or {}
            if node_id == self.net.node_id:
                speed = cached_speed(self.net.node.data_dir)
            else:
                if not self.net.member_online(node_id, now) or m.get("role") == "backup":
                    continue
                speed = (self.net.members_live[node_id].resources or {}).get("speed_tokens_s")
            members.append(MemberCapacity(node_id, int(alloc.get("ram_bytes") or 0),
                                          float(speed) if isinstance(speed, (int, float)) and speed > 0 else None))
        return members

    def _plan(self) -> Placement:
        current = self.placement
        epoch = (current.epoch if current else 0) + 1
        shape = ModelShape.from_model_file(self.model.file())
        try:
            return plan_placement(shape, self._members_in_chain_order(), epoch=epoch)
        except PlacementError as e:
            raise Conflict(str(e)) from None

    def _plan_result(self, p: Placement) -> dict:
        current = self.placement
        same = current is not None and [(a.node_id, a.range) for a in current.assignments] == \
            [(a.node_id, a.range) for a in p.assignments]
        return {"epoch": p.epoch, "current_epoch": current.epoch if current else None, "changes": not same,
                "placement": p.to_wire(), "rows": p.describe(), "notes": list(p.notes)}

    async def plan(self) -> dict:
        """The plan ``apply`` would write now (nothing changes)."""
        p = await asyncio.to_thread(self._plan)
        return self._plan_result(p)

    async def apply(self) -> dict:
        """Write a new placement into the signed config (pushed and acknowledged like any
        config change) and start sending every worker its blocks."""
        p = await asyncio.to_thread(self._plan)
        result = self._plan_result(p)
        sha = await self.model.sha256()

        def setter(config: dict) -> None:
            config["placement"] = p.to_wire()
            config["placement_model_sha256"] = sha

        signed = await self.net.commit(setter, "placement", epoch=p.epoch,
                                       ranges={a.node_id: f"{a.range.start}-{a.range.end - 1}" for a in p.assignments})
        self.proposal = None
        self.net.events.write("placement_applied", network=self.net.network_id, node=self.net.node_id,
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
            self.net.events.write("placement_proposed", network=self.net.network_id, node=self.net.node_id,
                                  reason=reason, epoch=p.epoch)

    # ---- distribution --------------------------------------------------------
    def start_distribution(self) -> None:
        """(Re)start loading the admin's own range and sending each worker its shard file."""
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
            coro = self._load_local(t) if a.node_id == self.net.node_id else self._send_shard_file(t, p.epoch)
            t.task = self.net.spawn(coro, f"blocks-{a.node_id}")

    def member_connected(self, node_id: str) -> None:
        """A worker (re)connected: make sure it holds and has loaded its range."""
        p = self.placement
        t = self.transfers.get(node_id)
        if p is None or p.range_of(node_id) is None:
            return
        if t is None or t.task is None or t.task.done():
            t = self.transfers[node_id] = Transfer(node_id, p.range_of(node_id))
            t.task = self.net.spawn(self._send_shard_file(t, p.epoch), f"blocks-{node_id}")

    async def _load_local(self, t: Transfer) -> None:
        t.state, t.message = "receiving", "loading from the model file"
        try:
            if self.host.block_range != t.block_range:
                await self.host.load_from_model(self.model.path, t.block_range)
            t.state, t.message = "loaded", "holds the model file"
            t.total_bytes = t.sent_bytes = 0
        except Exception as e:
            t.state, t.message = "failed", f"could not load blocks {t.block_range.start}-{t.block_range.end - 1}: {e}"
            log.error("network %s: %s", self.net.network_id, t.message)

    async def _shard_file(self, r: BlockRange) -> ShardBuild:
        """The shard file of block range ``r`` (built once in a thread; files of ranges no
        longer placed are forgotten)."""
        key = (r.start, r.end)
        if key not in self._shard_files:
            placed = {(a.range.start, a.range.end) for a in (self.placement.assignments if self.placement else ())}
            self._shard_files = {k: v for k, v in self._shard_files.items() if k in placed}
            self._shard_files[key] = await asyncio.to_thread(build_shard, self.model.path, r)
        return self._shard_files[key]

    async def _send_shard_file(self, t: Transfer, epoch: int) -> None:
        """Offer the worker its shard file and send what it lacks, chunk by chunk; retry while the
        placement stays the same (the worker may be offline or restart mid-way)."""
        backoff = 1.0
        while True:
            live = self.net.connected_member(t.node_id)
            if live is None:
                t.state, t.message = "offline", "waiting for the worker to connect"
                await asyncio.sleep(0.5)
                continue
            try:
                await self._transfer_once(t, epoch, RemoteStage(t.node_id, t.block_range, live))
                return
            except asyncio.CancelledError:
                raise
            except (ProtocolError, NetworkUnavailable, OSError) as e:
                t.message = str(e)
                if isinstance(e, ProtocolError) and not isinstance(e, NetworkUnavailable) and e.code in ("invalid_payload", "not_authorized"):
                    t.state = "failed"
                    log.error("network %s: sending blocks to %s failed: %s", self.net.network_id, t.node_id, e)
                    return
                log.info("network %s: blocks for %s interrupted (%s); retrying", self.net.network_id, t.node_id, e)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _transfer_once(self, t: Transfer, epoch: int, stage: RemoteStage) -> None:
        shard = await self._shard_file(t.block_range)
        t.total_bytes = len(shard.data)
        offer = {"epoch": epoch, "model_sha256": shard.model_sha256,
                 "block_range": protocol.block_range_to_wire(t.block_range), "shard_sha256": shard.sha256,
                 "shard_bytes": len(shard.data), "chunk_bytes": CHUNK_BYTES}
        status = (await stage.request("blocks_offer", offer)).payload
        have = status["have_bytes"]
        t.state, t.sent_bytes, t.message = status["state"], have, status["message"]
        if status["state"] == "loaded":
            self.net.events.write("blocks_present", network=self.net.network_id, node=t.node_id,
                                  shard=shard.sha256[:16])
            return
        if status["state"] == "failed":
            raise NetworkUnavailable(f"worker {t.node_id} refused the blocks: {status['message']}")
        self.net.events.write("blocks_sending", network=self.net.network_id, node=t.node_id,
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
                    raise NetworkUnavailable(f"worker {t.node_id} refused a chunk: {status['message']}")
                bar.update(status["have_bytes"] - have)
                have = status["have_bytes"]
                t.state, t.sent_bytes, t.message = status["state"], have, status["message"]
                if status["state"] in ("verified", "loaded"):
                    break
        if t.state != "loaded":
            raise NetworkUnavailable(f"worker {t.node_id} holds the blocks but did not load them: {t.message}")
        self.net.events.write("blocks_loaded", network=self.net.network_id, node=t.node_id,
                              shard=shard.sha256[:16], bytes=len(shard.data))
        log.info("network %s: %s holds blocks %d-%d (%s)", self.net.network_id, t.node_id, t.block_range.start,
                 t.block_range.end - 1, format_mib(len(shard.data)))

    def status(self) -> dict:
        """The ``distribution_status`` result: the placement's epoch, whether every range is
        loaded, each worker's Transfer, and the proposal made after the last join or leave."""
        p = self.placement
        workers = [t.to_wire() for t in self.transfers.values()]
        for w in workers:
            offline = self.net.connected_member(w["node_id"]) is None
            if w["node_id"] != self.net.node_id and offline and w["state"] == "loaded":
                w["state"], w["message"] = "offline", "the worker is not connected"
        ready = p is not None and bool(workers) and all(w["state"] == "loaded" for w in workers) and \
            len(workers) == len(p.assignments)
        return {"epoch": p.epoch if p else None, "ready": ready, "workers": workers, "proposal": self.proposal}

    # ---- the chain -----------------------------------------------------------
    def chain(self) -> Chain:
        """The stages in order, each loaded and connected. Raises NetworkUnavailable saying what is missing."""
        p = self.placement
        if p is None:
            raise NetworkUnavailable(f"network {self.net.config['name']} has no placement yet; an admin runs /workers rebalance")
        stages = []
        for a in p.assignments:
            t = self.transfers.get(a.node_id)
            if a.node_id == self.net.node_id:
                if self.host.block_range != a.range:
                    raise NetworkUnavailable("the admin's own blocks are still loading; try again in a moment")
                stages.append(self.local)
                continue
            live = self.net.connected_member(a.node_id)
            if live is None:
                raise NetworkUnavailable(f"worker {a.node_id} (blocks {a.range.start}-{a.range.end - 1}) is offline; "
                                         "start it again or run /workers rebalance without it")
            if t is None or t.state != "loaded":
                state = t.state if t else "not started"
                raise NetworkUnavailable(f"worker {a.node_id} is still receiving its blocks ({state}); see /workers rebalance")
            stages.append(RemoteStage(a.node_id, a.range, live))
        return Chain(stages)

    def reachable_stages(self) -> list[Any]:
        """The stages that can answer now: the admin's own (when loaded) and every connected
        worker's (10 s timeout), in placement order."""
        stages: list[Any] = [self.local] if self.host.block_range is not None else []
        p = self.placement
        for a in (p.assignments if p else ()):
            live = self.net.connected_member(a.node_id)
            if a.node_id != self.net.node_id and live is not None:
                stages.append(RemoteStage(a.node_id, a.range, live, timeout_s=10.0))
        return stages


__all__ = ["CHUNK_BYTES", "Distribution", "Transfer"]
