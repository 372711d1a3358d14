"""Placement: which member of a network runs which transformer blocks.

``plan(model, members, epoch=...)`` is a pure function (no I/O, no clock, no
randomness) from the model's shape and the members' RAM allocations, in chain
order, to one contiguous ``BlockRange`` per member that gets blocks. The result
is a ``Placement``, versioned by ``epoch`` and written into the network config
(``to_wire``/``from_wire``).

Memory a member needs
---------------------
The engine dequantizes every tensor to float32 at load, so a block costs
``block_bytes`` (its nine f32 tensors, see ``stage.load_block``) plus its KV
cache for ``context_tokens`` positions (``kv_bytes_per_token_per_block`` each).
The first range also holds the token embedding; the last holds the final norm
and the output head -- which, for a model whose head is tied to the embedding
(``head_bytes == 0``), is the embedding matrix itself, so a tied model's
embedding is held twice when the first and last ranges are on different
members (``Stage.from_model_file`` does exactly that). ``ModelShape.range_bytes``
is that sum; it is what ``Assignment.bytes`` reports and what must fit in the
member's ``ram_bytes``.

Algorithm
---------
1. Holders. Walk the members in chain order and drop every member that cannot
   hold even one block in its role: the first remaining member must fit the
   embedding and one block, the last one the head (and final norm) and one
   block, a single remaining member the whole of both, every other member one
   block. Dropping one member can change another's role, so repeat until
   nothing changes. A dropped member could hold no block in *any* valid
   placement (every member before it was dropped too), so this loses nothing.
   If the holders' capacities, in whole blocks, sum to less than the model,
   raise ``PlacementError`` saying how many bytes are missing.

2. Proportional shares with bounds ("water filling"). Member ``i`` with
   allocation ``R_i`` and fixed extra bytes ``e_i`` (embedding, head or 0)
   gets the real quota ``q_i(L) = clamp((L * R_i - e_i) / c, lo_i, hi_i)``
   blocks, where ``c`` is one block's bytes, ``hi_i`` its capacity in whole
   blocks, ``lo_i`` is 1 for the first and last holder (they carry the
   embedding and head, so they keep at least one block) and 0 otherwise, and
   ``L`` is the one fill level with ``sum(q_i) == n_block``. Unclamped, every
   member then holds the same fraction ``L`` of its allocation (bytes
   proportional to RAM, embedding and head included; with no embedding or
   head this is blocks proportional to RAM). A member whose share would
   overflow its allocation is held at its capacity and the excess goes to the
   others in proportion -- the "move the excess and iterate" procedure, done
   exactly: ``sum(q_i(L))`` is piecewise linear and non-decreasing in ``L``,
   so ``L`` is found between two breakpoints with exact rational arithmetic
   (``fractions.Fraction``), no iteration or floating point.

3. Whole blocks by the largest-remainder (Hamilton) method: each member gets
   ``floor(q_i)``; the blocks left over go one each to the members with the
   largest fractional remainders. Source: Alexander Hamilton's 1792
   apportionment method (the "largest remainder method"; Balinski & Young,
   *Fair Representation*, 2nd ed., 2001, ch. 2). Because the bounds are whole
   numbers, rounding never leaves them. Ties in the remainder go to the member
   with the higher measured ``speed_tokens_s`` (unmeasured last), then to the
   earlier member in chain order. Speed is used only for ties: the issue asks
   for placement by memory, and a speed measured for the whole model on one
   machine says little about a slice of it.

Members with no blocks (too small for their role, or left over when there are
more members than blocks, or whose share rounded to zero) are listed in
``Placement.unused`` with a sentence each in ``Placement.notes``.

A one-block model goes whole to the holder with the largest allocation that
fits it (ties: speed, then chain order).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from worker.engine.block_range import BlockRange
from worker.engine.gguf_file import ModelFile, ModelLoadError
from worker.protocol.units import format_bytes

F32_BYTES = 4
#: The tensors of one block, as ``stage.load_block`` loads them (``blk.<i>.<name>.weight``).
BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


class PlacementError(Exception):
    """The members cannot hold the model; ``str(e)`` says how much RAM is missing and what to do."""


class PlacementInvalid(ValueError):
    """A placement (e.g. read from a network config) is malformed; ``str(e)`` names the field."""


# --- inputs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The sizes placement needs, in bytes as the engine holds them (float32).

    ``block_bytes`` is one transformer block's weights (the largest block, if they
    differ); ``head_bytes`` is 0 when the output head is tied to the embedding;
    ``output_norm_bytes`` is the final norm (held with the head);
    ``kv_bytes_per_token_per_block`` is keys plus values of one position in one
    block; ``context_tokens`` is how many positions of KV cache to reserve per
    block (one session of the full context by default; multiply for sessions).

    Raises ValueError for negative sizes, ``n_block < 1`` or a block of 0 bytes.
    """

    model_id: str
    n_block: int
    block_bytes: int
    embedding_bytes: int
    head_bytes: int
    kv_bytes_per_token_per_block: int
    context_tokens: int
    output_norm_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("n_block", "block_bytes", "embedding_bytes", "head_bytes",
                     "kv_bytes_per_token_per_block", "context_tokens", "output_norm_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ModelShape.{name} must be a whole number >= 0, got {value!r}")
        if self.n_block < 1:
            raise ValueError(f"ModelShape.n_block must be >= 1, got {self.n_block}")
        if self.block_bytes < 1:
            raise ValueError("ModelShape.block_bytes must be >= 1: a block without weights cannot be placed")

    @property
    def tied_head(self) -> bool:
        """The output head is the embedding matrix (``head_bytes == 0``)."""
        return self.head_bytes == 0

    @property
    def per_block_bytes(self) -> int:
        """One block's weights plus its KV cache for ``context_tokens`` positions."""
        return self.block_bytes + self.kv_bytes_per_token_per_block * self.context_tokens

    @property
    def first_extra_bytes(self) -> int:
        """What the first range holds besides its blocks: the token embedding."""
        return self.embedding_bytes

    @property
    def last_extra_bytes(self) -> int:
        """What the last range holds besides its blocks: the final norm and the head
        (the embedding matrix when tied)."""
        return (self.embedding_bytes if self.tied_head else self.head_bytes) + self.output_norm_bytes

    @property
    def whole_extra_bytes(self) -> int:
        """Extras of a range that is both first and last (a tied matrix held once)."""
        return self.embedding_bytes + self.head_bytes + self.output_norm_bytes

    @property
    def total_bytes(self) -> int:
        """The whole model on one member."""
        return self.n_block * self.per_block_bytes + self.whole_extra_bytes

    def range_bytes(self, start: int, end: int) -> int:
        """Bytes a member holding blocks ``[start, end)`` needs (weights, extras, KV cache)."""
        if not 0 <= start < end <= self.n_block:
            raise ValueError(f"[{start}, {end}) is not a block range of a {self.n_block}-block model")
        first, last = start == 0, end == self.n_block
        extra = (self.whole_extra_bytes if first and last else
                 self.first_extra_bytes if first else self.last_extra_bytes if last else 0)
        return (end - start) * self.per_block_bytes + extra

    @classmethod
    def from_model_file(cls, mf: ModelFile, context_tokens: int | None = None) -> ModelShape:
        """Sizes of ``mf`` from its GGUF tensor table (nothing is dequantized).

        Every tensor counts ``n_elements * 4`` bytes (float32, as the engine holds it).
        ``context_tokens`` defaults to the model's context length. Raises ModelLoadError
        when a block tensor is missing.
        """
        cfg = mf.config
        tensors = {t.name: int(t.n_elements) for t in mf.reader.tensors}

        def f32(name: str) -> int:
            if name not in tensors:
                raise ModelLoadError(f"{mf.path} lacks the tensor {name}.")
            return tensors[name] * F32_BYTES

        block = max(sum(f32(f"blk.{i}.{t}.weight") for t in BLOCK_TENSORS) for i in range(cfg.n_block))
        return cls(
            model_id=mf.model_id,
            n_block=cfg.n_block,
            block_bytes=block,
            embedding_bytes=f32("token_embd.weight"),
            head_bytes=0 if cfg.tied_output else f32("output.weight"),
            kv_bytes_per_token_per_block=2 * cfg.n_kv_head * cfg.head_dim * F32_BYTES,
            context_tokens=cfg.context_length if context_tokens is None else context_tokens,
            output_norm_bytes=f32("output_norm.weight"),
        )


@dataclass(frozen=True)
class MemberCapacity:
    """One member as placement sees it: its RAM allocation and, if measured, its speed."""

    node_id: str
    ram_bytes: int
    speed_tokens_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise ValueError(f"MemberCapacity.node_id must be a non-empty string, got {self.node_id!r}")
        if isinstance(self.ram_bytes, bool) or not isinstance(self.ram_bytes, int) or self.ram_bytes < 0:
            raise ValueError(f"{self.node_id}: ram_bytes must be a whole number >= 0, got {self.ram_bytes!r}")
        s = self.speed_tokens_s
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0):
            raise ValueError(f"{self.node_id}: speed_tokens_s must be a positive number or None, got {s!r}")


# --- result ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Assignment:
    """Member ``node_id`` runs ``range``; ``bytes`` is the RAM that takes (see ModelShape.range_bytes)."""

    node_id: str
    range: BlockRange
    holds_embedding: bool
    holds_head: bool
    bytes: int


@dataclass(frozen=True)
class Placement:
    """Epoch ``epoch`` of a model's placement: ranges in chain order covering every block once.

    Raises PlacementInvalid on construction when the ranges do not chain from 0 to the
    model's block count, name another model, or a node appears twice.
    """

    model_id: str
    epoch: int
    assignments: tuple[Assignment, ...]
    unused: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.epoch, bool) or not isinstance(self.epoch, int) or self.epoch < 0:
            raise PlacementInvalid(f"epoch must be a whole number >= 0, got {self.epoch!r}")
        if not self.assignments:
            raise PlacementInvalid("a placement needs at least one assignment")
        total = self.assignments[0].range.total
        expected_start = 0
        for a in self.assignments:
            r = a.range
            if r.model_id != self.model_id or r.total != total:
                raise PlacementInvalid(f"{a.node_id}'s range {r} is not a range of {self.model_id} with {total} blocks")
            if r.start != expected_start:
                raise PlacementInvalid(f"{a.node_id}'s range {r} starts at block {r.start}; the chain needs {expected_start}")
            if a.holds_embedding != r.is_first or a.holds_head != r.is_last:
                raise PlacementInvalid(f"{a.node_id}: holds_embedding/holds_head must match whether {r} is first/last")
            expected_start = r.end
        if expected_start != total:
            raise PlacementInvalid(f"the ranges end at block {expected_start}, not at the model's {total}")
        nodes = [a.node_id for a in self.assignments] + list(self.unused)
        if len(set(nodes)) != len(nodes):
            raise PlacementInvalid("a node appears more than once in the placement")

    @property
    def n_block(self) -> int:
        return self.assignments[0].range.total

    def range_of(self, node_id: str) -> BlockRange | None:
        """The block range ``node_id`` runs, or None when it runs none."""
        return next((a.range for a in self.assignments if a.node_id == node_id), None)

    def to_wire(self) -> dict[str, Any]:
        """JSON for the network config::

            {"model_id": str, "epoch": int, "block_count": int,
             "assignments": [{"node_id", "start", "end", "holds_embedding", "holds_head", "bytes"}],
             "unused": [node_id], "notes": [str]}
        """
        return {
            "model_id": self.model_id, "epoch": self.epoch, "block_count": self.n_block,
            "assignments": [
                {"node_id": a.node_id, "start": a.range.start, "end": a.range.end,
                 "holds_embedding": a.holds_embedding, "holds_head": a.holds_head, "bytes": a.bytes}
                for a in self.assignments
            ],
            "unused": list(self.unused), "notes": list(self.notes),
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Placement:
        """The inverse of ``to_wire``. Raises PlacementInvalid for missing keys, wrong types
        or ranges that do not chain."""
        if not isinstance(d, Mapping):
            raise PlacementInvalid(f"a placement must be an object, got {type(d).__name__}")
        try:
            model_id, total = _typed(d, "model_id", str), _typed(d, "block_count", int)
            assignments = []
            for item in _typed(d, "assignments", list):
                if not isinstance(item, Mapping):
                    raise PlacementInvalid(f"an assignment must be an object, got {type(item).__name__}")
                assignments.append(Assignment(
                    node_id=_typed(item, "node_id", str),
                    range=BlockRange(model_id, _typed(item, "start", int), _typed(item, "end", int), total),
                    holds_embedding=_typed(item, "holds_embedding", bool),
                    holds_head=_typed(item, "holds_head", bool),
                    bytes=_typed(item, "bytes", int),
                ))
            unused = _typed(d, "unused", list)
            notes = _typed(d, "notes", list)
            if not all(isinstance(x, str) for x in unused + notes):
                raise PlacementInvalid("placement.unused and placement.notes must be lists of strings")
            return cls(model_id, _typed(d, "epoch", int), tuple(assignments), tuple(unused), tuple(notes))
        except ValueError as e:  # BlockRange's own check, or PlacementInvalid
            raise PlacementInvalid(str(e)) from None

    def describe(self) -> list[dict[str, str]]:
        """Rows for a table, one per member in chain order, then the unused ones:
        ``{"member", "blocks", "count", "holds", "memory"}``, e.g.
        ``{"member": "w1", "blocks": "0-14", "count": "15", "holds": "embedding", "memory": "512 MiB"}``."""
        rows = []
        for a in self.assignments:
            holds = [name for name, flag in (("embedding", a.holds_embedding), ("head", a.holds_head)) if flag]
            rows.append({"member": a.node_id, "blocks": f"{a.range.start}-{a.range.end - 1}", "count": str(len(a.range)),
                         "holds": ", ".join(holds) or "-", "memory": format_bytes(a.bytes)})
        for node in self.unused:
            rows.append({"member": node, "blocks": "none", "count": "0", "holds": "-", "memory": "0 B"})
        return rows


def _typed(d: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in d:
        raise PlacementInvalid(f"placement field {key!r} is missing")
    value = d[key]
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise PlacementInvalid(f"placement field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


# --- the plan ----------------------------------------------------------------------------


def plan(model: ModelShape, members: Sequence[MemberCapacity], *, epoch: int) -> Placement:
    """Contiguous block ranges for ``members`` (chain order, the admin first), proportional
    to their RAM allocations and within them; see the module docstring for the algorithm.

    Raises PlacementError when the allocations cannot hold the model (the message says how
    much is missing), ValueError for no members, a repeated node id or a bad epoch.
    """
    if not members:
        raise ValueError("plan needs at least one member")
    ids = [m.node_id for m in members]
    if len(set(ids)) != len(ids):
        raise ValueError(f"a node id appears twice among the members: {ids}")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be a whole number >= 0, got {epoch!r}")

    n, c = model.n_block, model.per_block_bytes
    notes: dict[int, str] = {}
    if n == 1:
        holders, counts = _single_block_holder(model, members, notes)
    else:
        holders, extras, caps = _holders(model, members, notes)
        if sum(caps) < n:
            raise PlacementError(_shortage(model, [members[i].ram_bytes for i in holders], extras, caps))
        if len(holders) == 1:
            counts = [n]
        else:
            lower = [1] + [0] * (len(holders) - 2) + [1]
            quotas = _fill(n, c, [members[i].ram_bytes for i in holders], extras, lower, caps)
            counts = _largest_remainder(n, quotas, [_tie_key(members[i], i) for i in holders])

    assignments, start = [], 0
    for i, count in zip(holders, counts):
        if count == 0:
            notes[i] = f"{members[i].node_id} gets no blocks: its proportional share rounded to none"
            continue
        r = BlockRange(model.model_id, start, start + count, n)
        assignments.append(Assignment(members[i].node_id, r, r.is_first, r.is_last, model.range_bytes(r.start, r.end)))
        start = r.end
    placed = {i for i, count in zip(holders, counts) if count}
    unused = [i for i in range(len(members)) if i not in placed]
    for i in unused:
        notes.setdefault(i, f"{members[i].node_id} gets no blocks: the other members hold the whole model")
    return Placement(model.model_id, epoch, tuple(assignments), tuple(members[i].node_id for i in unused),
                     tuple(notes[i] for i in unused))


def _role_extras(model: ModelShape, k: int) -> list[tuple[int, str]]:
    """Fixed extra bytes of ``k`` holders in chain order, with what they are for."""
    if k == 1:
        return [(model.whole_extra_bytes, "the embedding and the output head")]
    return ([(model.first_extra_bytes, "the token embedding")] + [(0, "")] * (k - 2)
            + [(model.last_extra_bytes, "the output head")])


def _holders(model: ModelShape, members: Sequence[MemberCapacity], notes: dict[int, str]) -> tuple[list[int], list[int], list[int]]:
    """Step 1: indices of the members that can hold a block in their role, their extra
    bytes and their capacities in whole blocks (at most ``n_block``)."""
    c = model.per_block_bytes
    holders = list(range(len(members)))
    while True:
        roles = _role_extras(model, len(holders)) if holders else []
        caps = [min(model.n_block, max(-1, (members[i].ram_bytes - e) // c)) for i, (e, _) in zip(holders, roles)]
        if all(cap >= 1 for cap in caps):
            return holders, [e for e, _ in roles], caps
        for i, (e, role), cap in zip(holders, roles, caps):
            if cap < 1:
                what = f"one block with {role}" if e else "one block with its KV cache"
                notes[i] = (f"{members[i].node_id} gets no blocks: its allocation of "
                            f"{format_bytes(members[i].ram_bytes)} is less than {what} ({format_bytes(e + c)})")
        holders = [i for i, cap in zip(holders, caps) if cap >= 1]


def _single_block_holder(model: ModelShape, members: Sequence[MemberCapacity], notes: dict[int, str]) -> tuple[list[int], list[int]]:
    """A one-block model: the largest allocation that holds all of it."""
    need = model.total_bytes
    fits = [i for i, m in enumerate(members) if m.ram_bytes >= need]
    if not fits:
        best = max(m.ram_bytes for m in members)
        raise PlacementError(
            f"The largest member allocation holds {format_bytes(best)}; the model needs {format_bytes(need)} "
            f"on one member: {format_bytes(need - best)} more; give a member more RAM or add a larger member"
        )
    best = min(fits, key=lambda i: (-members[i].ram_bytes, _tie_key(members[i], i)))
    return [best], [1]


def _shortage(model: ModelShape, rams: list[int], extras: list[int], caps: list[int]) -> str:
    """The PlacementError message: what the holders can take in whole blocks vs what the model needs."""
    c = model.per_block_bytes
    if not rams:
        held, needed = 0, model.total_bytes
    else:
        held = sum(e + cap * c for e, cap in zip(extras, caps))
        needed = sum(extras) + model.n_block * c
    kv = f" and a KV cache of {model.context_tokens} tokens" if model.kv_bytes_per_token_per_block and model.context_tokens else ""
    return (f"The members' allocations hold {format_bytes(held)} of the model in whole blocks; the model needs "
            f"{format_bytes(needed)} (f32 weights{kv}): {format_bytes(needed - held)} more; "
            f"allocate more RAM to a member or add a member")


def _fill(n: int, c: int, rams: list[int], extras: list[int], lower: list[int], upper: list[int]) -> list[Fraction]:
    """Step 2: real quotas ``clamp((L*R_i - e_i)/c, lo_i, hi_i)`` summing to exactly ``n``.

    Requires ``sum(lower) <= n <= sum(upper)`` and every ``R_i > 0``. The sum is piecewise
    linear and non-decreasing in ``L``; evaluate it at every breakpoint (where a member
    reaches a bound) and interpolate linearly inside the segment that crosses ``n``.
    """

    def quotas(level: Fraction) -> list[Fraction]:
        return [min(max((level * r - e) / c, Fraction(lo)), Fraction(hi))
                for r, e, lo, hi in zip(rams, extras, lower, upper)]

    breaks = sorted({Fraction(0)} | {Fraction(b * c + e, r) for r, e, lo, hi in zip(rams, extras, lower, upper) for b in (lo, hi)})
    prev_level, prev_sum = breaks[0], sum(quotas(breaks[0]))
    if prev_sum >= n:
        return quotas(prev_level)
    for level in breaks[1:]:
        total = sum(quotas(level))
        if total >= n:
            level = prev_level + (n - prev_sum) * (level - prev_level) / (total - prev_sum)
            return quotas(level)
        prev_level, prev_sum = level, total
    raise AssertionError("the capacities sum to less than the model; _holders should have caught it")


def _tie_key(m: MemberCapacity, index: int) -> tuple[float, int]:
    """Order among equal remainders: faster first (unmeasured last), then chain order."""
    return (-(m.speed_tokens_s or 0.0), index)


def _largest_remainder(n: int, quotas: list[Fraction], ties: list[tuple[float, int]]) -> list[int]:
    """Step 3, Hamilton's method: floors, then the leftover seats to the largest remainders."""
    counts = [math.floor(q) for q in quotas]
    left = n - sum(counts)
    order = sorted(range(len(quotas)), key=lambda j: (-(quotas[j] - counts[j]), ties[j]))
    for j in order[:left]:
        counts[j] += 1
    return counts


__all__ = ["Assignment", "MemberCapacity", "ModelShape", "Placement", "PlacementError", "PlacementInvalid", "plan"]
