"""Issue 6 end to end on real daemon processes (loopback, mTLS): placement in the signed
config, block distribution, pipelined generation over 1, 2 and 3 processes with the
reference's greedy ids, concurrent sessions, KV sessions that survive a worker restart."""
from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.support.daemons import start_daemon, wait_for
from tests.support.reference import reference
from worker.control import ControlError

pytestmark = pytest.mark.e2e  # every test here starts processes

def _ref(name: str) -> dict:
    return reference(name)


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    admin = start_daemon(root / "admin", "admin")
    w1 = start_daemon(root / "w1", "w1")
    w2 = start_daemon(root / "w2", "w2")
    procs = {"admin": admin, "w1": w1, "w2": w2, "root": root}
    yield procs
    for name in ("w2", "w1", "admin"):  # the tests may have replaced a restarted worker
        procs[name].stop()
    for d in (w2, w1):
        d.stop()


@pytest.fixture(scope="module")
def local_model():
    from worker.engine.model import LocalModel

    return LocalModel.load()


def greedy_ids(model, ids: list[int], n: int) -> list[int]:
    """The single-process engine's greedy continuation (no stop token), the reference for the chain."""
    from worker.engine.model import prefill

    session = "ref"
    logits = prefill(model.pipeline, session, ids)
    out, pos = [], len(ids)
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = model.pipeline.forward(session, np.asarray([tok]), pos)[0]
        pos += 1
    model.pipeline.drop_session(session)
    return out


async def infer(d, network_id: str, key: str, ids: list[int], n: int, **sampling) -> tuple[list[int], str, dict]:
    s = {"temperature": 0.0, "top_p": None, "top_k": None, "seed": None, "repetition_penalty": None,
         "ignore_eos": True, **sampling}
    tokens, text, usage = [], [], None
    async for piece in d.client.infer(network_id, key, ids, len(ids) + n, s):
        if piece["token_id"] is not None:
            tokens.append(piece["token_id"])
        text.append(piece["text"])
        if piece["done"]:
            usage = piece["usage"]
    return tokens, "".join(text), usage


async def join(admin, worker, network_id: str) -> None:
    token = (await admin.call("token_issue", network_id=network_id))["token"]
    assert (await worker.call("network_join", token=token))["state"] == "pending"
    await wait_for(lambda: _pending(admin, network_id, worker.node_id), what="join request")
    await admin.call("worker_approve", network_id=network_id, node_id=worker.node_id)

    async def online():
        ws = (await admin.call("workers_list", network_id=network_id))["workers"]
        return any(w["node_id"] == worker.node_id and w["state"] == "online" for w in ws)

    await wait_for(online, what=f"{worker.name} online")


async def _pending(admin, network_id, node_id):
    return any(p["node_id"] == node_id for p in (await admin.call("workers_list", network_id=network_id))["pending"])


async def apply_and_wait(admin, network_id: str, expect_stages: int) -> dict:
    plan = await admin.call("placement_plan", network_id=network_id)
    assert len(plan["placement"]["assignments"]) == expect_stages, plan["rows"]
    applied = await admin.call("placement_apply", network_id=network_id)
    assert applied["epoch"] == plan["epoch"] and applied["config_version"] >= 2
    seen = []

    async def ready():
        st = await admin.call("distribution_status", network_id=network_id)
        seen.append(st)
        assert not any(w["state"] == "failed" for w in st["workers"]), st
        return st if st["ready"] else None

    status = await wait_for(ready, timeout=180, interval=0.2, what="blocks distributed and loaded")
    return {"plan": plan, "applied": applied, "status": status, "seen": seen}


@pytest.fixture(scope="module")
def network(procs):
    admin = procs["admin"]

    async def make():
        return (await admin.call("network_create", name="inference lab"))["network"]["network_id"]

    return asyncio.run(make())


async def test_placement_distribution_and_reference_greedy_ids_over_1_2_3_processes(procs, network, local_model):
    admin, w1, w2 = procs["admin"], procs["w1"], procs["w2"]
    france, persian = _ref("france"), _ref("persian_greeting")

    # one process: the admin holds all 30 blocks
    r = await apply_and_wait(admin, network, 1)
    assert r["status"]["workers"][0]["block_range"] == "0-29" and r["status"]["workers"][0]["state"] == "loaded"
    ids, _, usage = await infer(admin, network, "one-france", france["prompt_ids"], 32)
    assert ids == france["greedy_ids"]
    assert usage["stages"] == 1 and usage["cached_tokens"] == 0

    # two processes
    await join(admin, w1, network)
    r = await apply_and_wait(admin, network, 2)
    ranges = {w["node_id"]: w for w in r["status"]["workers"]}
    assert ranges[admin.node_id]["block_range"].startswith("0-")
    sent = ranges[w1.node_id]
    assert sent["state"] == "loaded" and sent["sent_bytes"] == sent["total_bytes"] > 1_000_000
    # the shard is a slice of the model, not the whole file
    from worker.engine.gguf_file import default_model_path
    assert sent["total_bytes"] < Path(default_model_path()).stat().st_size * 0.75
    ids, _, usage = await infer(admin, network, "two-france", france["prompt_ids"], 32)
    assert ids == france["greedy_ids"] and usage["stages"] == 2
    ids, _, _ = await infer(admin, network, "two-persian", persian["prompt_ids"], 32)
    assert ids == persian["greedy_ids"]

    # three processes; the config every member acknowledged carries the placement
    await join(admin, w2, network)
    r = await apply_and_wait(admin, network, 3)
    cfg = json.loads((admin.data_dir / f"network_config_{network}.json").read_text())["config"] \
        if (admin.data_dir / f"network_config_{network}.json").exists() else None
    assert r["applied"]["placement"]["epoch"] == r["applied"]["epoch"]
    for w in (w1, w2):
        async def acked(w=w):
            st = await admin.call("network_status", network_id=network)
            return st["versions"].get(w.node_id) == r["applied"]["config_version"]
        await wait_for(acked, what=f"{w.name} acknowledged the placement")
    del cfg
    ids, _, usage = await infer(admin, network, "three-france", france["prompt_ids"], 32)
    assert ids == france["greedy_ids"] and usage["stages"] == 3
    ids, _, _ = await infer(admin, network, "three-persian", persian["prompt_ids"], 32)
    assert ids == persian["greedy_ids"]

    # the chain equals the single-process engine on a prompt of our own too
    mine = local_model.tokenizer.encode_chat([{"role": "user", "content": "Name three colours."}])
    ids, text, _ = await infer(admin, network, "three-colours", mine, 24)
    assert ids == greedy_ids(local_model, mine, 24)
    assert text == local_model.tokenizer.decode(ids, skip_special=True)

    # applying the same plan again sends nothing: every worker already holds its blocks
    before = [e for e in admin.events() if e.get("event") == "blocks_sending"]
    await apply_and_wait(admin, network, 3)
    after = [e for e in admin.events() if e.get("event") == "blocks_sending"]
    assert len(after) == len(before)


async def test_concurrent_sessions_are_isolated(procs, network, local_model):
    admin = procs["admin"]
    await wait_for(lambda: _ready(admin, network), timeout=120, what="ready")
    prompts = [local_model.tokenizer.encode_chat([{"role": "user", "content": c}])
               for c in ("What is 2+2?", "Say hello in French.", "Name a planet.", "What colour is the sky?")]
    before = await admin.call("distribution_status", network_id=network)
    results = await asyncio.gather(*(infer(admin, network, f"conc-{i}", p, 16) for i, p in enumerate(prompts)))
    after = await admin.call("distribution_status", network_id=network)
    for p, (ids, _, _) in zip(prompts, results):
        assert ids == greedy_ids(local_model, p, 16)
    # their decode steps went through the chain together: several rows per pass
    passes = after["decode_passes"] - before["decode_passes"]
    rows = after["decode_rows"] - before["decode_rows"]
    assert rows == 4 * 15 and passes < rows / 1.5, (passes, rows)


async def _ready(admin, network):
    return (await admin.call("distribution_status", network_id=network))["ready"]


async def test_sessions_survive_a_worker_restart_without_recompute(procs, network, local_model):
    admin, w2 = procs["admin"], procs["w2"]
    await wait_for(lambda: _ready(admin, network), timeout=120, what="ready")
    tok = local_model.tokenizer
    turn1 = tok.encode_chat([{"role": "user", "content": "Tell me about cats."}])
    ids1, _, u1 = await infer(admin, network, "resume", turn1, 12)
    assert u1["cached_tokens"] == 0

    listing = (await admin.call("sessions_list", network_id=network))["sessions"]
    mine = [s for s in listing if s["session_id"].endswith(".resume")]
    assert mine and len(mine[0]["nodes"]) == 3 and mine[0]["bytes"] > 0 and mine[0]["n_tokens"] >= len(turn1)

    # the last stage's worker restarts; its blocks stay on disk and its KV session too
    w2.stop()
    restarted = start_daemon(w2.data_dir, "w2")
    procs["w2"] = restarted
    await wait_for(lambda: _ready(admin, network), timeout=120, what="ready after the restart")
    log_tail = restarted.log()
    assert "Traceback" not in log_tail[-5000:]

    turn2 = turn1 + ids1 + tok.encode("\nAnd dogs?")
    ids2, _, u2 = await infer(admin, network, "resume", turn2, 12)
    # the prefix every stage already held was not recomputed ...
    assert u2["cached_tokens"] >= len(turn1)
    # ... and the continuation equals the uninterrupted one
    assert ids2 == greedy_ids(local_model, turn2, 12)

    dropped = await admin.call("session_drop", network_id=network, session_id=mine[0]["session_id"])
    assert dropped["dropped"] == 3
    listing = (await admin.call("sessions_list", network_id=network))["sessions"]
    assert not [s for s in listing if s["session_id"] == mine[0]["session_id"]]


# ---- what the workers learn of a conversation (issue 13, finding 11) ---------------------------

def _id_patterns(ids: list[int], width: int = 6) -> list[bytes]:
    """Every run of ``width`` consecutive prompt ids as a file could hold it: int32/int64 in both
    byte orders, and as JSON/Python list text."""
    out = []
    for i in range(0, len(ids) - width + 1):
        run = ids[i:i + width]
        out += [np.asarray(run, dt).tobytes() for dt in ("<i4", "<i8", ">i4", ">i8")]
        out += [", ".join(map(str, run)).encode(), ",".join(map(str, run)).encode()]
    return out


def _files_of(d) -> list[Path]:
    files = [p for p in d.data_dir.rglob("*") if p.is_file()]
    return files + ([d.log_path] if d.log_path.exists() else [])


def _session_files(d, network: str, session_key: str) -> list[Path]:
    """The saved session files of ``<network>.<session_key>`` on daemon ``d`` (by their clear header)."""
    from worker.engine.paged_kv import read_header

    root = d.data_dir / "networks" / network / "stage" / "sessions"
    return [p for p in root.glob("*/*.kv.npz") if read_header(p).get("session_id") == f"{network}.{session_key}"]


def _open_session_file(d, network: str, path: Path) -> bytes:
    """The archive inside a worker's sealed session file, opened with that worker's network key."""
    from worker.crypto_at_rest import decrypt_blob
    from worker.engine import BlockRange
    from worker.stage_host import session_aad

    data = path.read_bytes()
    n = int.from_bytes(data[5:9], "big")
    head = data[:9 + n]
    meta = json.loads(head[9:])
    r = BlockRange(meta["model_id"], meta["block_start"], meta["block_end"], meta["block_total"])
    key = (d.data_dir / "networks" / network / "blocks.key").read_bytes()
    return decrypt_blob(key, data[len(head):], session_aad(network, r) + head)


async def test_workers_after_the_first_never_receive_or_keep_the_prompts_token_ids(procs, network, local_model):
    admin, w1, w2 = procs["admin"], procs["w1"], procs["w2"]
    await wait_for(lambda: _ready(admin, network), timeout=120, what="ready")
    tok = local_model.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "My bank PIN is 4711 and my cat is called Whiskers."}])
    ids, _, usage = await infer(admin, network, "private", prompt, 8)
    assert usage["stages"] == 3 and ids == greedy_ids(local_model, prompt, 8)
    patterns = _id_patterns(prompt)
    for w in (w1, w2):
        # the forward rows this worker received carried no token ids (its stage host counts them)
        counts = re.findall(r"forward rows received: (\d+), with token ids: (\d+)", w.log())
        assert counts and int(counts[-1][0]) > 0, w.name
        assert all(t == "0" for _, t in counts), counts
        # nothing it keeps (blocks, sessions, events, config, its log) holds a run of the prompt's ids
        for path in _files_of(w):
            data = path.read_bytes()
            assert not any(pat in data for pat in patterns), f"{w.name}: {path} holds the prompt's token ids"
        # its session file is sealed: no archive without the key, the archive with it
        [path] = _session_files(w, network, "private")
        data = path.read_bytes()
        assert data[:4] == b"AKVS" and b"PK\x03\x04" not in data
        archive = _open_session_file(w, network, path)
        assert archive[:4] == b"PK\x03\x04"
        with np.load(io.BytesIO(archive)) as z:
            assert set(z["token_ids"].tolist()) == {-1} and z["digests"].shape[1] == 16


async def test_a_tampered_session_file_on_a_worker_is_refused_and_the_next_turn_answers_right(procs, network, local_model):
    admin, w2 = procs["admin"], procs["w2"]
    await wait_for(lambda: _ready(admin, network), timeout=120, what="ready")
    tok = local_model.tokenizer
    turn1 = tok.encode_chat([{"role": "user", "content": "Tell me about owls."}])
    ids1, _, _ = await infer(admin, network, "tampered", turn1, 8)
    [path] = _session_files(w2, network, "tampered")
    w2.stop()  # so that the next turn reads the file, not the cache in memory
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    restarted = start_daemon(w2.data_dir, "w2")
    procs["w2"] = restarted
    await wait_for(lambda: _ready(admin, network), timeout=120, what="ready after the restart")

    turn2 = turn1 + ids1 + tok.encode("\nAnd eagles?")
    ids2, _, u2 = await infer(admin, network, "tampered", turn2, 8)
    assert ids2 == greedy_ids(local_model, turn2, 8)  # recomputed, the same answer
    assert u2["cached_tokens"] == 0  # the last stage had nothing usable: every stage started over
    log = restarted.log()
    assert "does not open" in log and "Traceback" not in log[-20000:]
    [again] = _session_files(restarted, network, "tampered")
    assert _open_session_file(restarted, network, again)[:4] == b"PK\x03\x04"  # saved anew after the answer


async def test_a_vanished_worker_gives_a_clear_error(procs, network, local_model):
    admin = procs["admin"]
    await wait_for(lambda: _ready(admin, network), timeout=120, what="ready")
    w = procs["w2"]
    w.stop()
    try:
        with pytest.raises(ControlError) as e:
            await infer(admin, network, "gone", local_model.tokenizer.encode("hi"), 4)
        assert "offline" in e.value.message or "disconnected" in e.value.message
        assert w.node_id in e.value.message
    finally:
        procs["w2"] = start_daemon(w.data_dir, "w2")
    await wait_for(lambda: _ready(admin, network), timeout=120, what="ready again")


async def test_placement_errors_are_sentences(procs, network):
    admin = procs["admin"]
    with pytest.raises(ControlError) as e:
        await admin.call("placement_plan", network_id="net-doesnotexist")
    assert e.value.code == "not_found"
    st = await admin.call("distribution_status", network_id=network)
    assert st["epoch"] >= 1
