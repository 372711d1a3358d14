"""Placement: a pure function from members' allocations to contiguous block ranges."""
from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.engine.gguf_file import ModelFile, default_model_path
from worker.engine.block_range import BlockRange
from worker.placement import (
    MemberCapacity,
    ModelShape,
    Placement,
    PlacementError,
    PlacementInvalid,
    plan,
)

MiB, GiB = 2**20, 2**30


def shape(n_block=30, block=10 * MiB, embedding=0, head=0, kv=0, ctx=0, norm=0) -> ModelShape:
    return ModelShape("m", n_block, block, embedding, head, kv, ctx, norm)


def members(*rams: int) -> list[MemberCapacity]:
    return [MemberCapacity(f"n{i}", ram) for i, ram in enumerate(rams)]


def counts(p: Placement) -> list[int]:
    return [len(a.range) for a in p.assignments]


def assert_valid(p: Placement, model: ModelShape, ms: list[MemberCapacity]) -> None:
    """Ranges chain from 0 to n in chain order, and every member's bytes fit its allocation."""
    ram = {m.node_id: m.ram_bytes for m in ms}
    order = [m.node_id for m in ms]
    assert [a.range.start for a in p.assignments] == [0] + [a.range.end for a in p.assignments[:-1]]
    assert p.assignments[-1].range.end == model.n_block
    assert [order.index(a.node_id) for a in p.assignments] == sorted(order.index(a.node_id) for a in p.assignments)
    for a in p.assignments:
        assert a.bytes == model.range_bytes(a.range.start, a.range.end)
        assert a.bytes <= ram[a.node_id]
    assert sorted([a.node_id for a in p.assignments] + list(p.unused)) == sorted(order)


def test_one_member_gets_every_block_and_both_ends():
    model = shape(embedding=50 * MiB, head=50 * MiB, norm=1024)
    p = plan(model, members(GiB), epoch=3)
    (a,) = p.assignments
    assert (a.node_id, a.range) == ("n0", BlockRange("m", 0, 30, 30))
    assert a.holds_embedding and a.holds_head
    assert a.bytes == 30 * 10 * MiB + 100 * MiB + 1024
    assert p.epoch == 3 and p.unused == ()


def test_equal_members_get_equal_ranges():
    p = plan(shape(), members(GiB, GiB, GiB), epoch=1)
    assert counts(p) == [10, 10, 10]
    assert [a.range.start for a in p.assignments] == [0, 10, 20]


def test_unequal_members_one_two_three_get_blocks_in_proportion():
    p = plan(shape(n_block=60, block=MiB), members(GiB, 2 * GiB, 3 * GiB), epoch=1)
    assert counts(p) == [10, 20, 30]


def test_largest_remainders_get_the_leftover_blocks():
    # quotas 30*1/6, 30*2/6... with 31 blocks: 5.17, 10.33, 15.5 -> floors 5,10,15, one left -> 15.5 wins
    p = plan(shape(n_block=31, block=MiB), members(GiB, 2 * GiB, 3 * GiB), epoch=1)
    assert counts(p) == [5, 10, 16]


def test_equal_remainders_go_to_the_faster_member_then_to_chain_order():
    ms = [MemberCapacity("a", GiB), MemberCapacity("b", GiB, 5.0), MemberCapacity("c", GiB, 9.0)]
    assert counts(plan(shape(n_block=4, block=MiB), ms, epoch=1)) == [1, 1, 2]
    assert counts(plan(shape(n_block=4, block=MiB), members(GiB, GiB, GiB), epoch=1)) == [2, 1, 1]


def test_first_and_last_ranges_make_room_for_embedding_and_head():
    model = shape(n_block=30, block=10 * MiB, embedding=100 * MiB, head=100 * MiB)
    p = plan(model, members(GiB, GiB, GiB), epoch=1)
    first, middle, last = p.assignments
    assert first.holds_embedding and not first.holds_head
    assert last.holds_head and not last.holds_embedding
    assert not (middle.holds_embedding or middle.holds_head)
    # every member fills the same fraction of an equal allocation: the middle takes the embedding's worth more blocks
    assert len(middle.range) > len(first.range) and len(middle.range) > len(last.range)
    assert first.bytes == len(first.range) * 10 * MiB + 100 * MiB
    assert last.bytes == len(last.range) * 10 * MiB + 100 * MiB


def test_tied_head_means_the_last_member_also_holds_the_embedding_matrix():
    model = shape(n_block=10, block=MiB, embedding=20 * MiB, head=0, norm=4096)
    p = plan(model, members(GiB, GiB), epoch=1)
    assert p.assignments[-1].bytes == len(p.assignments[-1].range) * MiB + 20 * MiB + 4096
    alone = plan(model, members(GiB), epoch=1).assignments[0]
    assert alone.bytes == 10 * MiB + 20 * MiB + 4096  # held once on a single member


def test_kv_cache_for_the_context_counts_per_block():
    model = shape(n_block=4, block=MiB, kv=1024, ctx=1024)  # 1 MiB weights + 1 MiB KV per block
    p = plan(model, members(8 * MiB), epoch=1)
    assert p.assignments[0].bytes == 8 * MiB
    with pytest.raises(PlacementError):
        plan(model, members(8 * MiB - 1), epoch=1)


def test_more_members_than_blocks_leaves_some_without_blocks():
    p = plan(shape(n_block=3, block=MiB), members(*[GiB] * 5), epoch=1)
    assert counts(p) == [1, 1, 1]
    assert len(p.unused) == 2
    assert p.assignments[0].node_id == "n0" and p.assignments[-1].node_id == "n4"  # both ends stay on the chain's ends
    assert all("no blocks" in note for note in p.notes) and len(p.notes) == 2


def test_a_member_too_small_for_one_block_gets_none_and_is_reported():
    p = plan(shape(block=10 * MiB), members(GiB, 5 * MiB, GiB), epoch=1)
    assert [a.node_id for a in p.assignments] == ["n0", "n2"]
    assert p.unused == ("n1",)
    assert p.notes == ("n1 gets no blocks: its allocation of 5 MiB is less than one block with its KV cache (10 MiB)",)


def test_a_first_member_that_cannot_hold_the_embedding_passes_it_on():
    model = shape(n_block=10, block=MiB, embedding=100 * MiB)
    p = plan(model, members(50 * MiB, GiB, GiB), epoch=1)
    assert p.unused == ("n0",)
    assert p.assignments[0].node_id == "n1" and p.assignments[0].holds_embedding
    assert "token embedding" in p.notes[0]


def test_a_one_block_model_goes_to_the_largest_member_that_holds_it():
    p = plan(shape(n_block=1, block=MiB, embedding=MiB), members(GiB, 2 * GiB, GiB), epoch=1)
    assert [(a.node_id, a.range.start, a.range.end) for a in p.assignments] == [("n1", 0, 1)]
    assert p.unused == ("n0", "n2")


def test_capacity_short_of_the_model_says_how_much_is_missing():
    model = shape(n_block=30, block=40 * MiB, embedding=10 * MiB, head=0)  # 30*40 + 10 + 10 (tied, twice) = 1220 MiB
    with pytest.raises(PlacementError) as e:
        plan(model, members(205 * MiB, 205 * MiB), epoch=1)
    # each member holds 10 MiB + 4 blocks (170 MiB): 340 MiB; the model needs 1.2 GiB: 880 MiB more
    assert str(e.value) == (
        "The members' allocations hold 340 MiB of the model in whole blocks; the model needs 1.2 GiB "
        "(f32 weights): 880 MiB more; allocate more RAM to a member or add a member"
    )


def test_adding_the_missing_bytes_to_one_member_makes_the_plan_fit():
    model = shape(n_block=30, block=40 * MiB, embedding=10 * MiB)
    with pytest.raises(PlacementError):
        plan(model, members(205 * MiB, 205 * MiB), epoch=1)
    assert plan(model, members(205 * MiB + 880 * MiB, 205 * MiB), epoch=1).assignments[-1].range.end == 30


def test_no_member_able_to_hold_anything_is_a_placement_error():
    with pytest.raises(PlacementError, match="hold 0 B"):
        plan(shape(block=10 * MiB), members(MiB, 0), epoch=1)


def test_placement_is_deterministic():
    ms = [MemberCapacity(f"w{i}", (i * 7919 % 13 + 1) * 97 * MiB, float(i % 3) or None) for i in range(7)]
    model = shape(n_block=41, block=9 * MiB, embedding=33 * MiB, head=21 * MiB, kv=96, ctx=2048, norm=512)
    assert len({json.dumps(plan(model, ms, epoch=2).to_wire()) for _ in range(5)}) == 1


def test_wire_round_trip_is_json():
    model = shape(n_block=12, block=MiB, embedding=3 * MiB, head=3 * MiB)
    p = plan(model, members(GiB, 5, 2 * GiB), epoch=7)
    wire = json.loads(json.dumps(p.to_wire()))
    assert Placement.from_wire(wire) == p
    assert wire["epoch"] == 7 and wire["block_count"] == 12 and wire["unused"] == ["n1"]


@pytest.mark.parametrize("mutate, message", [
    (lambda w: w["assignments"][1].update(start=5), "starts at block 5"),
    (lambda w: w["assignments"][-1].update(end=11, holds_head=False), "end at block 11"),
    (lambda w: w.pop("epoch"), "'epoch' is missing"),
    (lambda w: w.update(epoch="7"), "'epoch' must be int"),
    (lambda w: w["assignments"][0].update(holds_embedding=False), "holds_embedding"),
    (lambda w: w["assignments"][0].update(end=0), "empty"),
])
def test_a_malformed_wire_placement_is_refused(mutate, message):
    wire = plan(shape(n_block=12, block=MiB), members(GiB, GiB), epoch=7).to_wire()
    mutate(wire)
    with pytest.raises(PlacementInvalid, match=message):
        Placement.from_wire(wire)


def test_describe_gives_one_row_per_member():
    p = plan(shape(n_block=10, block=MiB, embedding=2 * MiB, head=2 * MiB), members(GiB, 1, GiB), epoch=1)
    assert p.describe() == [
        {"member": "n0", "blocks": "0-4", "count": "5", "holds": "embedding", "memory": "7 MiB"},
        {"member": "n2", "blocks": "5-9", "count": "5", "holds": "head", "memory": "7 MiB"},
        {"member": "n1", "blocks": "none", "count": "0", "holds": "-", "memory": "0 B"},
    ]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="at least one member"):
        plan(shape(), [], epoch=1)
    with pytest.raises(ValueError, match="twice"):
        plan(shape(), [MemberCapacity("a", GiB), MemberCapacity("a", GiB)], epoch=1)
    with pytest.raises(ValueError, match="epoch"):
        plan(shape(), members(GiB), epoch=-1)
    with pytest.raises(ValueError, match="ram_bytes"):
        MemberCapacity("a", -1)


def test_the_packaged_smollm2_shape_places_over_three_members():
    model = ModelShape.from_model_file(ModelFile(default_model_path()))
    # SmolLM2-135M: 30 blocks of 9 f32 tensors, a tied 49152 x 576 embedding, 3 KV heads of 64
    assert model.n_block == 30
    assert model.block_bytes == 4 * (2 * 576 + 576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536)
    assert model.embedding_bytes == 4 * 49152 * 576 and model.head_bytes == 0 and model.output_norm_bytes == 4 * 576
    assert model.kv_bytes_per_token_per_block == 2 * 3 * 64 * 4 and model.context_tokens == 8192
    p = plan(model, members(GiB, GiB, GiB), epoch=1)
    assert_valid(p, model, members(GiB, GiB, GiB))
    assert [a.range.end for a in p.assignments][-1] == 30 and len(p.assignments) == 3
    with pytest.raises(PlacementError, match="more; allocate more RAM"):
        plan(model, members(256 * MiB, 256 * MiB), epoch=1)


# --- properties ------------------------------------------------------------------------


def feasible(model: ModelShape, ms: list[MemberCapacity]) -> bool:
    """Brute force: is there any contiguous assignment in chain order that fits every member?"""
    n = model.n_block
    for cuts in itertools.combinations_with_replacement(range(n + 1), len(ms) - 1):
        bounds = [0, *cuts, n]
        if all(s == e or model.range_bytes(s, e) <= m.ram_bytes for m, s, e in zip(ms, bounds, bounds[1:])):
            return True
    return False


model_shapes = st.builds(
    shape,
    n_block=st.integers(1, 9), block=st.integers(1, 64), embedding=st.integers(0, 200),
    head=st.integers(0, 200), kv=st.integers(0, 4), ctx=st.integers(0, 8), norm=st.integers(0, 8),
)
member_lists = st.lists(st.integers(0, 900), min_size=1, max_size=4).map(lambda rams: members(*rams))


@settings(max_examples=400, deadline=None)
@given(model_shapes, member_lists)
def test_a_plan_fits_every_allocation_and_fails_only_when_nothing_fits(model, ms):
    try:
        p = plan(model, ms, epoch=1)
    except PlacementError:
        assert not feasible(model, ms)
    else:
        assert_valid(p, model, ms)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 200), st.lists(st.integers(1, 10**6), min_size=2, max_size=8))
def test_unconstrained_counts_are_floor_or_ceiling_of_the_proportional_quota(n, weights):
    # roomy allocations, no embedding or head: blocks proportional to RAM, except that
    # the chain's two ends keep at least one block each
    ms = members(*[w * 10**6 for w in weights])
    p = plan(shape(n_block=n, block=1), ms, epoch=1)
    got = {a.node_id: len(a.range) for a in p.assignments}
    if any(w * n < sum(weights) for w in (weights[0], weights[-1])):
        return  # an end's quota is below its floor of one block
    for m, w in zip(ms, weights):
        quota = n * w / sum(weights)
        assert int(quota) - 1e-9 <= got.get(m.node_id, 0) <= int(quota) + 1 + 1e-9
