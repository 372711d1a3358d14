"""Stage.forward_batch: rows of several sessions through one stage at once compute what per-session
forward calls compute, keep the sessions apart, rewind, and reproduce llama.cpp's greedy ids when
the model is split over stages and two conversations decode in lockstep.

Both ways forward_batch multiplies are tested: per session (bit-identical to forward; the default
up to PER_SESSION_MATMUL_MAX_ROWS sessions) and one gemm over all rows (equal up to float32
summation order)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.support.reference import reference
from worker.engine import BlockRange, Stage
from worker.engine.paged_kv import SessionPagedKVCache
from worker.engine.stage import PER_SESSION_MATMUL_MAX_ROWS

ATOL = 1e-4  # logits; a gemm over the batch and a gemv per row add in different orders
MAX_ROWS = {"per_session": 1000, "one_gemm": 0, None: None}  # Stage(per_session_matmul_max_rows=...) by mode


@pytest.fixture(params=["per_session", "one_gemm"])
def mode(request) -> str:
    """How forward_batch multiplies, forced whatever the number of rows (pass it to ``stages``)."""
    return request.param


def paged_caches(r: BlockRange, cfg):
    """A Stage's kv_cache factory: in-memory paged caches of range ``r``."""
    return lambda session_id: SessionPagedKVCache(r, cfg.n_kv_head, cfg.head_dim)


def stages(model, per_stage: int, paged: bool = False, mode: str | None = None) -> list[Stage]:
    """Fresh stages (their own sessions) of ``per_stage`` blocks over the loaded model's weights;
    ``mode`` forces how forward_batch multiplies (None: the default limit)."""
    whole = model.pipeline.stages[0]
    cfg = whole.cfg
    out = []
    for r in BlockRange.split_even(whole.block_range.model_id, whole.block_range.total, per_stage):
        cache = paged_caches(r, cfg) if paged else None
        out.append(Stage(
            r, cfg, whole.blocks[r.start : r.end],
            embedding=whole.embedding if r.is_first else None,
            output_norm=whole.output_norm if r.is_last else None,
            output=whole.output if r.is_last else None, kv_cache=cache,
            per_session_matmul_max_rows=MAX_ROWS[mode],
        ))
    return out


def batch_through(chain: list[Stage], rows: list[tuple[str, int, list[int]]]) -> np.ndarray:
    """rows through every stage with forward_batch -> logits [B, vocab]."""
    x = np.concatenate([np.asarray(ids, dtype=np.int64) for _, _, ids in rows])
    for s in chain:
        x = s.forward_batch(rows, x)
    return x


def one_through(chain: list[Stage], sid: str, start: int, ids: list[int]) -> np.ndarray:
    """One session's positions through every stage with forward -> logits [vocab]."""
    x = np.asarray(ids, dtype=np.int64)
    for s in chain:
        x = s.forward(sid, x, start, token_ids=ids)
    return x[0]


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 49000, L).tolist() for L in lengths]


def assert_same_logits(batched: np.ndarray, single: np.ndarray, mode: str) -> None:
    if mode == "per_session":
        assert np.array_equal(batched, single)
    else:
        assert int(np.argmax(batched)) == int(np.argmax(single))
        np.testing.assert_allclose(batched, single, rtol=0, atol=ATOL)


@pytest.mark.parametrize("per_stage,paged", [(30, False), (10, True)], ids=["one_stage", "three_stages_paged"])
def test_batched_prefill_of_rows_of_different_lengths_equals_per_row_forward(local_model, mode, per_stage, paged):
    batched, single = stages(local_model, per_stage, paged, mode), stages(local_model, per_stage, paged, mode)
    ps = prompts([1, 7, 23, 64, 2])
    rows = [(f"s{i}", 0, p) for i, p in enumerate(ps)]
    logits = batch_through(batched, rows)
    assert logits.shape == (5, local_model.pipeline.stages[0].cfg.vocab_size) and logits.dtype == np.float32
    for i, p in enumerate(ps):
        assert_same_logits(logits[i], one_through(single, f"s{i}", 0, p), mode)
        assert all(s.session_length(f"s{i}") == len(p) for s in batched)
    if paged:
        assert all(s.cached_prefix("s2", ps[2]) == len(ps[2]) for s in batched)


def test_mixed_decode_and_prefill_rows_equal_per_row_forward(local_model, mode):
    batched, single = stages(local_model, 30, mode=mode), stages(local_model, 30, mode=mode)
    ps = prompts([12, 5, 30], seed=1)
    for chain in (batched, single):  # two sessions already hold a prompt
        one_through(chain, "a", 0, ps[0])
        one_through(chain, "b", 0, ps[1])
    rows = [("a", 12, [4519]), ("c", 0, ps[2]), ("b", 5, [28, 906, 1012])]  # decode, new prompt, continuation
    logits = batch_through(batched, rows)
    for (sid, start, ids), row in zip(rows, logits):
        assert_same_logits(row, one_through(single, sid, start, ids), mode)
    assert [batched[0].session_length(s) for s in "abc"] == [13, 8, 30]


def test_a_stage_that_is_not_last_returns_every_rows_hidden_states(local_model, mode):
    first_b, first_s = stages(local_model, 15, mode=mode)[0], stages(local_model, 15, mode=mode)[0]
    ps = prompts([3, 9], seed=2)
    h = first_b.forward_batch([("x", 0, ps[0]), ("y", 0, ps[1])], np.array(ps[0] + ps[1]))
    assert h.shape == (12, first_b.cfg.d_model) and h.dtype == np.float32
    alone = np.concatenate([first_s.forward("x", np.array(ps[0]), 0), first_s.forward("y", np.array(ps[1]), 0)])
    if mode == "per_session":
        assert np.array_equal(h, alone)
    else:
        np.testing.assert_allclose(h, alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_sessions_decoding_in_one_batch_do_not_see_each_others_state(local_model, mode):
    batched, single = stages(local_model, 30, mode=mode), stages(local_model, 30, mode=mode)
    ps = prompts([9, 21, 4], seed=3)
    sids = ["alice", "bob", "carol"]
    last = dict(zip(sids, batch_through(batched, [(s, 0, p) for s, p in zip(sids, ps)])))
    got = {s: [] for s in sids}
    for step in range(8):  # lockstep, and from step 4 on "bob" sits out every other step
        active = [s for s in sids if not (s == "bob" and step >= 4 and step % 2)]
        toks = {s: int(np.argmax(last[s])) for s in active}
        for s, t in toks.items():
            got[s].append(t)
        rows = [(s, batched[0].session_length(s), [t]) for s, t in toks.items()]
        last.update(zip(active, batch_through(batched, rows)))
    assert [len(got[s]) for s in sids] == [8, 6, 8]
    for s, p in zip(sids, ps):  # each session alone, as many greedy steps as it took in the batch
        logit, alone, pos = one_through(single, s, 0, p), [], len(p)
        for _ in got[s]:
            alone.append(int(np.argmax(logit)))
            logit = one_through(single, s, pos, [alone[-1]])
            pos += 1
        assert alone == got[s], s
        assert_same_logits(last[s], logit, mode)
        assert batched[0].session_length(s) == single[0].session_length(s)


@pytest.mark.parametrize("paged", [False, True], ids=["kv_cache", "paged"])
def test_a_row_starting_before_the_cached_length_rewinds_its_session_only(local_model, mode, paged):
    batched, single = stages(local_model, 30, paged, mode), stages(local_model, 30, paged, mode)
    ps = prompts([16, 10], seed=4)
    batch_through(batched, [("r", 0, ps[0]), ("k", 0, ps[1])])
    new = [7031, 314, 3575]
    logits = batch_through(batched, [("r", 6, new), ("k", 10, [446])])  # "r" forgets positions 6..15
    assert batched[0].session_length("r") == 9 and batched[0].session_length("k") == 11
    one_through(single, "r", 0, ps[0])
    assert_same_logits(logits[0], one_through(single, "r", 6, new), mode)
    fresh = one_through(single, "fresh", 0, ps[0][:6] + new)  # never saw positions 6..15 of the old prompt
    assert_same_logits(logits[0], fresh, "one_gemm")  # (prefills of 16 and 9 rows add in different orders)
    one_through(single, "k", 0, ps[1])
    assert_same_logits(logits[1], one_through(single, "k", 10, [446]), mode)
    if paged:
        assert batched[0].session_cache("r").token_ids == ps[0][:6] + new


def test_up_to_the_per_session_limit_a_batch_is_bit_identical_by_default(local_model):
    batched, single = stages(local_model, 30), stages(local_model, 30)
    ps = prompts([2] * PER_SESSION_MATMUL_MAX_ROWS, seed=5)
    logits = batch_through(batched, [(f"s{i}", 0, p) for i, p in enumerate(ps)])
    for i, p in enumerate(ps):
        assert np.array_equal(logits[i], one_through(single, f"s{i}", 0, p))


def test_invalid_batches_are_refused_before_any_session_changes(local_model):
    (stage,) = stages(local_model, 30)
    stage.forward_batch([("a", 0, [1, 2, 3])], np.array([1, 2, 3]))
    bad = [
        ([("a", 3, [4]), ("a", 4, [5])], np.array([4, 5]), "distinct sessions"),
        ([("a", 3, [4]), ("b", 0, [])], np.array([4]), "at least one token"),
        ([("a", 3, [4]), ("b", 0, [5])], np.array([4, 6]), "concatenated"),
        ([("a", 3, [4]), ("b", 0, [5])], np.array([4]), "cover 2 positions"),
        ([("a", 3, [4]), ("b", 2, [5])], np.array([4, 5]), "session b: position 2 skips past the cached 0"),
        ([], np.array([], dtype=np.int64), "at least one row"),
    ]
    for rows, x, message in bad:
        with pytest.raises(ValueError, match=message):
            stage.forward_batch(rows, x)
    assert stage.session_length("a") == 3 and stage.session_length("b") == 0
    second = stages(local_model, 15)[1]
    with pytest.raises(ValueError, match="hidden states"):
        second.forward_batch([("a", 0, [1, 2])], np.zeros((2, 5), np.float32))


@pytest.mark.parametrize("per_stage", [15, 10], ids=["two_stages", "three_stages"])
def test_two_conversations_decoded_in_lockstep_over_split_stages_give_llama_cpps_greedy_ids(local_model, mode, per_stage):
    chain = stages(local_model, per_stage, mode=mode)
    cases = {"france": reference("france"), "persian": reference("persian_greeting")}
    logits = batch_through(chain, [(c, 0, ref["prompt_ids"]) for c, ref in cases.items()])
    got = {c: [] for c in cases}
    for _ in range(32):
        toks = [int(t) for t in np.argmax(logits, axis=-1)]
        for c, t in zip(cases, toks):
            got[c].append(t)
        logits = batch_through(chain, [(c, chain[0].session_length(c), [t]) for c, t in zip(cases, toks)])
    assert got["france"] == cases["france"]["greedy_ids"]
    assert got["persian"] == cases["persian"]["greedy_ids"]
