"""Paged KV cache sessions on the real model: same greedy ids as the default cache, resumption after a
restart without recomputing the prefix, page boundaries, refused and damaged files, LRU eviction."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil

import numpy as np
import pytest

from tests.support.reference import reference
from worker.engine import BlockRange, ModelFile, Pipeline, Stage, default_model_path
from worker.engine.model import prefill
from worker.engine.paged_kv import (
    PAGE_TOKENS, IncompatibleSessionFile, Sealer, SessionFileError, SessionPagedKVCache, SessionStore, read_header,
)

CASES = ["france", "persian_greeting"]
END_OF_TURN = 2  # <|im_end|>


def chain(model, per_stage: int, kv_cache_for) -> Pipeline:
    """Stages of ``per_stage`` blocks over the loaded model's weights (no second copy);
    ``kv_cache_for(range)`` gives each stage its cache factory (None: the default KVCache)."""
    whole = model.pipeline.stages[0]
    ranges = BlockRange.split_even(whole.block_range.model_id, whole.block_range.total, per_stage)
    return Pipeline([
        Stage(
            r, whole.cfg, whole.blocks[r.start : r.end],
            embedding=whole.embedding if r.is_first else None,
            output_norm=whole.output_norm if r.is_last else None,
            output=whole.output if r.is_last else None,
            kv_cache=kv_cache_for(r),
        )
        for r in ranges
    ])


def paged(model):
    """kv_cache_for: in-memory paged caches (no store)."""
    cfg = model.pipeline.stages[0].cfg
    return lambda r: (lambda session_id: SessionPagedKVCache(r, cfg.n_kv_head, cfg.head_dim))


class stores_for:
    """kv_cache_for: one SessionStore per stage, in ``root/<start>-<end>`` (as a daemon keeps them);
    the stores made are in ``.made``, in stage order."""

    def __init__(self, model, root, **limits):
        self.cfg, self.root, self.limits, self.made = model.pipeline.stages[0].cfg, root, limits, []

    def __call__(self, r: BlockRange):
        store = SessionStore(self.root / f"{r.start}-{r.end}", r, self.cfg.n_kv_head, self.cfg.head_dim, **self.limits)
        self.made.append(store)
        return store.open


def greedy(pipeline: Pipeline, session: str, ids: list[int], n: int, start: int = 0) -> list[int]:
    """Prefill ``ids[start:]`` (chunked, as a generation does), then ``n`` argmax tokens."""
    logits = prefill(pipeline, session, ids, start=start)
    return decode(pipeline, session, logits, len(ids), n)


def decode(pipeline: Pipeline, session: str, logits: np.ndarray, pos: int, n: int, stop: bool = False) -> list[int]:
    """Up to ``n`` argmax tokens from ``logits`` at position ``pos``; with ``stop``, end before end-of-turn
    (as a chat answer does). Every returned token but an n-th has been run (is cached)."""
    out = []
    while True:
        tok = int(np.argmax(logits))
        if stop and tok == END_OF_TURN:
            return out
        out.append(tok)
        if len(out) == n:
            return out
        logits = pipeline.forward(session, np.array([tok]), pos)[0]
        pos += 1


def a_cache(model, r: BlockRange, ids: list[int], session: str = "s") -> SessionPagedKVCache:
    """The real K/V of ``ids`` for the blocks of ``r`` (one of the model split in ranges of len(r))."""
    p = chain(model, len(r), paged(model))
    p.forward(session, np.array(ids), 0)
    return next(s for s in p.stages if s.block_range == r).session_cache(session)


def text_ids(model, n: int) -> list[int]:
    ids = model.tokenizer.encode(" ".join(f"item {i} is on the list;" for i in range(n)))
    assert len(ids) >= n
    return ids[:n]


# (1) the paged cache is a drop-in -------------------------------------------------------

@pytest.mark.parametrize("per_stage", [30, 10], ids=["one_stage", "three_stages"])
@pytest.mark.parametrize("case", CASES)
def test_paged_cache_gives_the_same_greedy_ids_as_the_default_cache_and_llama_cpp(local_model, case, per_stage):
    ref = reference(case)
    default_ids = greedy(chain(local_model, per_stage, lambda r: None), "s", ref["prompt_ids"], 32)
    p = chain(local_model, per_stage, paged(local_model))
    paged_ids = greedy(p, "s", ref["prompt_ids"], 32)
    assert paged_ids == default_ids == ref["greedy_ids"]
    caches = [s.session_cache("s") for s in p.stages]
    assert all(isinstance(c, SessionPagedKVCache) for c in caches)
    assert all(c.token_ids == ref["prompt_ids"] + ref["greedy_ids"][:31] for c in caches)  # the 32nd is not run


# (2) a conversation continues after a restart without recomputing its prefix ---------------

def test_a_conversation_resumes_after_a_restart_from_the_saved_cache_without_recomputing_the_prefix(local_model, tmp_path):
    tok = local_model.tokenizer
    first = [{"role": "user", "content": "What is the capital of France?"}]
    ids1 = tok.encode_chat(first)

    # before the restart: three stages, one store each; answer, then save after the answer
    stores = stores_for(local_model, tmp_path)
    before = chain(local_model, 10, stores)
    answer = decode(before, "conv", prefill(before, "conv", ids1), len(ids1), 64, stop=True)
    assert tok.decode(answer) == "The capital of France is Paris."
    for stage, store in zip(before.stages, stores.made):
        store.save("conv", stage.session_cache("conv"))

    ids2 = tok.encode_chat(first + [
        {"role": "assistant", "content": tok.decode(answer)}, {"role": "user", "content": "And the capital of Italy?"},
    ])
    resume = before.cached_prefix("conv", ids2)
    assert resume == len(ids1) + len(answer) and ids2[:resume] == ids1 + answer
    uninterrupted = greedy(before, "conv", ids2, 16, start=resume)
    assert uninterrupted == greedy(chain(local_model, 30, lambda r: None), "scratch", ids2, 16)

    # the restart: a fresh model file, fresh stages and fresh stores on the same directories
    mf = ModelFile(default_model_path())
    restarted = stores_for(local_model, tmp_path)
    after = Pipeline([Stage.from_model_file(mf, s.block_range, kv_cache=restarted(s.block_range)) for s in before.stages])
    assert [[(x.session_id, x.n_tokens) for x in st.sessions()] for st in restarted.made] == [[("conv", resume)]] * 3
    assert all(s.session_cache("conv") is None for s in after.stages)  # listed, not loaded yet

    assert after.cached_prefix("conv", ids2) == resume  # first use: loaded from disk
    caches = [s.session_cache("conv") for s in after.stages]
    assert [c.computed_positions for c in caches] == [0, 0, 0]
    logits = prefill(after, "conv", ids2, start=resume)
    assert [c.computed_positions for c in caches] == [len(ids2) - resume] * 3  # only the new suffix was run
    assert decode(after, "conv", logits, len(ids2), 16) == uninterrupted


# (3) page boundaries ---------------------------------------------------------------------

@pytest.mark.parametrize("n", [PAGE_TOKENS - 1, PAGE_TOKENS, PAGE_TOKENS + 1])
def test_save_and_load_at_a_page_boundary_keep_every_position(local_model, tmp_path, n):
    ids = text_ids(local_model, n)
    stores = stores_for(local_model, tmp_path)
    before = chain(local_model, 30, stores)
    prefill(before, "s", ids)
    cache = before.stages[0].session_cache("s")
    assert cache.n_pages == math.ceil(n / PAGE_TOKENS) and cache.nbytes % cache.page_nbytes == 0
    stores.made[0].save("s", cache)

    loaded = stores_for(local_model, tmp_path)
    after = chain(local_model, 30, loaded)
    assert after.cached_prefix("s", ids) == n
    copy = after.stages[0].session_cache("s")
    assert (copy.n_tokens, copy.n_pages, copy.token_ids) == (n, math.ceil(n / PAGE_TOKENS), ids)
    for name, a in cache.arrays().items():
        np.testing.assert_array_equal(copy.arrays()[name], a)
    for pos, t in enumerate([504, 3575, 282], start=n):  # on across the next page boundary
        np.testing.assert_allclose(after.forward("s", np.array([t]), pos), before.forward("s", np.array([t]), pos), atol=1e-5)


def test_pages_are_allocated_whole_and_grow_geometrically_and_rewinding_forgets_ids():
    r = BlockRange("m", 0, 1, 1)
    kv = SessionPagedKVCache(r, n_kv_head=2, head_dim=4, page_tokens=4)
    caps = []
    for pos in range(100):
        keys, _ = kv.write(0, np.full((2, 1, 4), pos, np.float32), np.zeros((2, 1, 4), np.float32), pos)
        kv.commit(pos + 1, [pos])
        assert keys.shape == (2, pos + 1, 4) and keys[0, pos, 0] == pos
        assert kv.capacity_pages >= kv.n_pages == math.ceil((pos + 1) / 4)
        assert kv.nbytes == 2 * kv.capacity_pages * kv.page_nbytes
        caps.append(kv.capacity_pages)
    growths = sorted(set(caps))
    assert all(b >= 1.5 * a for a, b in zip(growths[1:], growths[2:]))
    assert len(growths) < 12
    kv.write(0, np.zeros((2, 2, 4), np.float32), np.zeros((2, 2, 4), np.float32), 10)  # rewind to 10, two new
    kv.commit(12, [7, 7])
    assert kv.n_tokens == 12 and kv.token_ids == list(range(10)) + [7, 7]
    assert kv.matching_prefix(list(range(20))) == 10


def test_a_stage_not_told_the_token_ids_never_claims_a_prefix(local_model):
    p = chain(local_model, 10, paged(local_model))
    ids = reference("france")["prompt_ids"]
    h = p.stages[0].forward("s", np.array(ids), 0)
    p.stages[1].forward("s", h, 0)  # hidden states only, as a worker that was not sent the ids
    assert p.stages[0].cached_prefix("s", ids) == len(ids)
    assert p.stages[1].session_cache("s").token_ids == [-1] * len(ids)
    assert p.stages[1].cached_prefix("s", ids) == 0


# (4) files for another model, range or format are refused -----------------------------------

def test_a_file_for_another_model_range_or_format_is_refused(local_model, tmp_path, caplog):
    whole = local_model.pipeline.stages[0]
    mid, cfg = whole.block_range.model_id, whole.cfg
    r0, r1 = BlockRange(mid, 0, 10, 30), BlockRange(mid, 10, 20, 30)
    path = tmp_path / "s.kv.npz"
    a_cache(local_model, r0, reference("france")["prompt_ids"]).save_to_disk(path, "s")

    other_range = SessionPagedKVCache(r1, cfg.n_kv_head, cfg.head_dim)
    with pytest.raises(IncompatibleSessionFile, match=re.escape("[0:10]/30") + ".*" + re.escape("[10:20]/30")):
        other_range.load_from_disk(path)
    assert other_range.n_tokens == 0
    with pytest.raises(IncompatibleSessionFile, match="another-model"):
        SessionPagedKVCache(BlockRange("another-model", 0, 10, 30), cfg.n_kv_head, cfg.head_dim).load_from_disk(path)

    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = read_header(path)
    np.savez_compressed(tmp_path / "v2.npz", **{**arrays, "header": np.array(json.dumps({**header, "version": 2}))})
    with pytest.raises(IncompatibleSessionFile, match="version 2"):
        SessionPagedKVCache(r0, cfg.n_kv_head, cfg.head_dim).load_from_disk(tmp_path / "v2.npz")

    # a store for the other range does not list it: the file is deleted on opening, with a warning
    (tmp_path / "stage1").mkdir()
    shutil.copy(path, tmp_path / "stage1" / "s.kv.npz")
    with caplog.at_level(logging.WARNING, logger="worker.engine.paged_kv"):
        store = SessionStore(tmp_path / "stage1", r1, cfg.n_kv_head, cfg.head_dim)
    assert store.sessions() == [] and not (tmp_path / "stage1" / "s.kv.npz").exists()
    assert "deleted unusable saved session file" in caplog.text and "[10:20]/30" in caplog.text
    with pytest.raises(IncompatibleSessionFile):
        store.save("s", a_cache(local_model, r0, [1, 2, 3]))


# (5) LRU eviction by count and by size ----------------------------------------------------------

EVICTED = r"evicted session {} \(\d+\.\d MiB, last used \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\) to stay under {}"


def test_the_least_recently_used_session_is_evicted_beyond_the_count_limit(local_model, tmp_path, caplog):
    r = BlockRange(local_model.model_id, 0, 10, 30)
    cfg = local_model.pipeline.stages[0].cfg
    store = SessionStore(tmp_path, r, cfg.n_kv_head, cfg.head_dim, max_sessions=2)
    ids = reference("france")["prompt_ids"]
    store.save("a", a_cache(local_model, r, ids))
    store.save("b", a_cache(local_model, r, ids[:20]))
    assert store.load("a").token_ids == ids  # a is now used more recently than b
    with caplog.at_level(logging.INFO, logger="worker.engine.paged_kv"):
        store.save("c", a_cache(local_model, r, ids[:30]))
    assert [s.session_id for s in store.sessions()] == ["c", "a"]
    assert not store.path_for("b").exists()
    assert re.search(EVICTED.format("b", "2 saved sessions"), caplog.text), caplog.text


def test_least_recently_used_sessions_are_evicted_beyond_the_size_limit_also_after_a_restart(local_model, tmp_path, caplog):
    r = BlockRange(local_model.model_id, 0, 10, 30)
    cfg = local_model.pipeline.stages[0].cfg
    ids = reference("france")["prompt_ids"]
    store = SessionStore(tmp_path, r, cfg.n_kv_head, cfg.head_dim)
    sizes = {sid: store.save(sid, a_cache(local_model, r, ids)).nbytes for sid in ("a", "b", "c")}
    assert store.total_bytes == sum(sizes.values()) == sum(os.path.getsize(s.path) for s in store.sessions())

    limit = sizes["b"] + sizes["c"] + sizes["c"] // 2
    with caplog.at_level(logging.INFO, logger="worker.engine.paged_kv"):
        restarted = SessionStore(tmp_path, r, cfg.n_kv_head, cfg.head_dim, max_bytes=limit)  # order from file times
    assert [s.session_id for s in restarted.sessions()] == ["c", "b"]
    assert re.search(EVICTED.format("a", re.escape(f"{limit / 2**20:.1f} MiB of saved sessions")), caplog.text)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="worker.engine.paged_kv"):
        restarted.save("d", a_cache(local_model, r, ids))
    assert [s.session_id for s in restarted.sessions()] == ["d", "c"] and restarted.total_bytes <= limit
    assert re.search(EVICTED.format("b", ".*MiB of saved sessions"), caplog.text)


def test_sessions_are_listed_with_size_tokens_and_last_use_and_can_be_dropped(local_model, tmp_path, caplog):
    r = BlockRange(local_model.model_id, 0, 10, 30)
    cfg = local_model.pipeline.stages[0].cfg
    store = SessionStore(tmp_path, r, cfg.n_kv_head, cfg.head_dim)
    odd = "Conv 1/../ä"  # any id, stored under a hashed file name inside the directory
    saved = store.save(odd, a_cache(local_model, r, [1, 2, 3, 4, 5]))
    assert saved.path.parent == tmp_path and saved.path.name.startswith("_")
    [listed] = SessionStore(tmp_path, r, cfg.n_kv_head, cfg.head_dim).sessions()
    assert (listed.session_id, listed.n_tokens, listed.nbytes) == (odd, 5, os.path.getsize(saved.path))
    assert listed.last_used == pytest.approx(saved.last_used, abs=1e-3)
    with caplog.at_level(logging.INFO, logger="worker.engine.paged_kv"):
        assert store.drop(odd) is True
    assert store.drop(odd) is False and store.sessions() == [] and not saved.path.exists()
    assert f"dropped saved session {odd}" in caplog.text


# (6) damaged files ------------------------------------------------------------------------------

def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "bytes_flipped":
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) + data[mid + 64 :])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"not a session file at all\n" * 40)


@pytest.mark.parametrize("how", ["truncated", "bytes_flipped", "empty", "garbage"])
def test_a_damaged_file_gives_a_clear_error_and_the_conversation_is_recomputed(local_model, tmp_path, caplog, how):
    ref = reference("france")
    stores = stores_for(local_model, tmp_path)
    before = chain(local_model, 30, stores)
    prefill(before, "conv", ref["prompt_ids"])
    path = stores.made[0].save("conv", before.stages[0].session_cache("conv")).path
    damage(path, how)

    with pytest.raises(SessionFileError, match=r"unreadable|not a saved session|no header") as e:
        SessionPagedKVCache(before.stages[0].block_range, before.stages[0].cfg.n_kv_head, before.stages[0].cfg.head_dim).load_from_disk(path)
    assert str(path) in str(e.value)

    with caplog.at_level(logging.WARNING, logger="worker.engine.paged_kv"):
        restarted = stores_for(local_model, tmp_path)
        after = chain(local_model, 30, restarted)
        assert after.cached_prefix("conv", ref["prompt_ids"]) == 0  # nothing usable: recompute
    assert "saved session" in caplog.text and str(path) in caplog.text
    assert not path.exists() and restarted.made[0].sessions() == []
    assert greedy(after, "conv", ref["prompt_ids"], 8) == ref["greedy_ids"][:8]


def test_an_interrupted_save_keeps_the_previous_file(local_model, tmp_path, monkeypatch):
    r = BlockRange(local_model.model_id, 0, 10, 30)
    cfg = local_model.pipeline.stages[0].cfg
    store = SessionStore(tmp_path, r, cfg.n_kv_head, cfg.head_dim)
    ids = reference("france")["prompt_ids"]
    store.save("s", a_cache(local_model, r, ids[:10]))

    def disk_full(f, **arrays):  # the disk fills up half-way through the archive
        f.write(b"PK\x03\x04" + b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.save("s", a_cache(local_model, r, ids))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["s.kv.npz"]  # no temporary file left behind
    assert store.load("s").token_ids == ids[:10]


# (7) prefix digests instead of token ids, and sealed files (issue 13, finding 11) ----------------

def toy_sealer(key: bytes = b"k" * 32):
    """A stand-in for the daemon's AES-GCM sealer (the engine knows no cryptography): XOR with a
    keystream and an HMAC tag over the associated data and the ciphertext."""
    import hashlib
    import hmac

    def stream(n):
        return (hashlib.sha256(key).digest() * (n // 32 + 1))[:n]

    def seal(data, ad):
        ct = bytes(a ^ b for a, b in zip(data, stream(len(data))))
        return ct + hmac.digest(key, ad + ct, "sha256")

    def open_(blob, ad):
        ct, tag = blob[:-32], blob[-32:]
        if not hmac.compare_digest(tag, hmac.digest(key, ad + ct, "sha256")):
            raise ValueError("tag mismatch")
        return bytes(a ^ b for a, b in zip(ct, stream(len(ct))))

    return Sealer(seal=seal, open=open_, name="toy")


def digests(n: int, salt: int = 0) -> list[bytes]:
    return [bytes([0xAA, salt, i % 256, i // 256]) + bytes(12) for i in range(n)]  # never all zeros (unknown)


def test_a_stage_given_prefix_digests_records_and_matches_them_instead_of_token_ids(local_model, tmp_path):
    p = chain(local_model, 10, paged(local_model))
    ids = reference("france")["prompt_ids"]
    marks = digests(len(ids))
    h = p.stages[0].forward("s", np.array(ids), 0, token_ids=marks)
    p.stages[1].forward_batch([("s", 0, marks)], h)
    for s in p.stages[:2]:
        cache = s.session_cache("s")
        assert cache.token_ids == [-1] * len(ids) and cache.marks == marks
        assert s.cached_prefix("s", marks + digests(3, salt=9)) == len(ids)
        assert s.cached_prefix("s", marks[:5] + digests(len(ids), salt=1)[5:]) == 5
        assert s.cached_prefix("s", ids) == 0  # token ids never match digests
    store = SessionStore(tmp_path, p.stages[1].block_range, p.stages[1].cfg.n_kv_head, p.stages[1].cfg.head_dim)
    store.save("s", p.stages[1].session_cache("s"))
    assert store.load("s").marks == marks


def test_a_sealed_store_writes_no_archive_and_loads_what_it_sealed(local_model, tmp_path):
    r = BlockRange(local_model.model_id, 0, 10, 30)
    cfg = local_model.pipeline.stages[0].cfg
    ids = reference("france")["prompt_ids"]
    store = SessionStore(tmp_path, r, cfg.n_kv_head, cfg.head_dim, sealer=toy_sealer())
    cache = a_cache(local_model, r, ids)
    saved = store.save("s", cache)
    data = saved.path.read_bytes()
    assert data[:4] == b"AKVS" and b"PK\x03\x04" not in data
    assert np.asarray(ids, np.int64).tobytes() not in data
    h = read_header(saved.path)
    assert h["sealed"] is True and h["session_id"] == "s" and h["n_tokens"] == len(ids)

    restarted = SessionStore(tmp_path, r, cfg.n_kv_head, cfg.head_dim, sealer=toy_sealer())
    loaded = restarted.load("s")
    assert loaded.token_ids == ids
    for name, a in cache.arrays().items():
        np.testing.assert_array_equal(loaded.arrays()[name], a)
    with pytest.raises(SessionFileError, match="no key"):  # a sealed file without the sealer
        SessionPagedKVCache(r, cfg.n_kv_head, cfg.head_dim).load_from_disk(saved.path)


@pytest.mark.parametrize("how", ["flip_body", "flip_header", "other_key", "truncated"])
def test_a_sealed_file_that_does_not_open_is_dropped_with_a_warning(local_model, tmp_path, caplog, how):
    r = BlockRange(local_model.model_id, 0, 10, 30)
    cfg = local_model.pipeline.stages[0].cfg
    ids = reference("france")["prompt_ids"]
    store = SessionStore(tmp_path, r, cfg.n_kv_head, cfg.head_dim, sealer=toy_sealer())
    path = store.save("s", a_cache(local_model, r, ids)).path
    data = bytearray(path.read_bytes())
    sealer = toy_sealer()
    if how == "flip_body":
        data[-100] ^= 0x40
    elif how == "flip_header":
        data[:] = bytes(data).replace(b'"saved_at": 17', b'"saved_at": 16', 1)  # same length, another claim
    elif how == "other_key":
        sealer = toy_sealer(b"x" * 32)
    else:
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="worker.engine.paged_kv"):
        restarted = SessionStore(tmp_path, r, cfg.n_kv_head, cfg.head_dim, sealer=sealer)
        assert restarted.load("s") is None and restarted.open("s").n_tokens == 0
    assert "does not open" in caplog.text and not path.exists()


def test_a_plaintext_file_in_a_sealed_store_is_deleted(local_model, tmp_path, caplog):
    r = BlockRange(local_model.model_id, 0, 10, 30)
    cfg = local_model.pipeline.stages[0].cfg
    SessionStore(tmp_path, r, cfg.n_kv_head, cfg.head_dim).save("s", a_cache(local_model, r, [1, 2, 3]))
    with caplog.at_level(logging.WARNING, logger="worker.engine.paged_kv"):
        sealed = SessionStore(tmp_path, r, cfg.n_kv_head, cfg.head_dim, sealer=toy_sealer())
    assert sealed.sessions() == [] and os.listdir(tmp_path) == []
    assert "plaintext file in a sealed store" in caplog.text
