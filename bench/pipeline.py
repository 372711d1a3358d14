"""Pipeline benchmark (issue 6): one model over 1, 2 and 3 worker processes against one process.

    python bench/pipeline.py [--quick] [--json out.json] [--repeats 3] [--prompt-tokens 128] [--new-tokens 64]

Prints, from one run on this machine:
  * the engine alone, in this process (``LocalModel.load()``: one stage of 30 blocks):
    ``Stage.forward_batch`` with B = 1, 4, 8 decode rows (aggregate tokens/s = B x steps / wall
    time, ratio to B = 1);
  * the same model on real ``python -m worker serve`` processes on 127.0.0.1 with mutual TLS
    (tests/support/daemons.py): an admin creates a network, 0, 1 or 2 workers join
    (token_issue -> network_join -> worker_approve), ``placement_apply``, wait for
    ``distribution_status.ready``, then ``ControlClient.infer`` with a fresh conversation key per
    repeat (nothing cached). Prefill tokens/s = prompt tokens / ``usage.prefill_ms`` (the admin's
    own clock); decode tokens/s = (n - 1) / (arrival of token n - arrival of token 1) at the
    client, i.e. including sampling, detokenizing and the stream to the client; time to first
    token from the client's side. Medians of ``--repeats``;
  * the reference for each of those three configurations, measured in this process right before
    it (so both see about the same load of the shared machine): the one-stage ``LocalModel``'s
    prefill tokens/s for the same chat prompt of about ``--prompt-tokens`` tokens and decode
    tokens/s over the same ``--new-tokens`` greedy steps (first token from the prefill's logits,
    as in the network runs); the ratios;
  * decode step time per configuration, its excess over the adjacent reference's step, and the
    overhead each added process brings per step ((step_k - step_1) / (k - 1));
  * concurrent sessions on the 1-process and the 3-process network: B = 1, 4, 8 conversations
    with distinct keys, ``--concurrent-tokens`` tokens each, run with ``asyncio.gather``. Each
    conversation's prompt is computed first (a 1-token answer), so the measured run's prefill is
    one token and the run is decode-bound. Aggregate tokens/s is computed from the arrival times
    of the pieces: "phase" = every decode token (all but each session's first) / (last arrival of
    any session - first token of the first session); "steady" = tokens arriving while all B
    sessions are decoding / that window's length. Ratio against B = 1.
Greedy decoding with ``ignore_eos`` so every run produces exactly the requested tokens. All
processes are stopped and the temporary directory removed at the end, also on errors.
Results go into docs/PERFORMANCE.md by hand.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.daemons import DaemonProcess, start_daemon, wait_for  # noqa: E402
from worker.engine.model import LocalModel, prefill  # noqa: E402

#: Every field of protocol.SAMPLING_FIELDS: greedy, never stopping at end-of-turn.
GREEDY = {"temperature": 0.0, "top_p": None, "top_k": None, "seed": None, "repetition_penalty": None,
          "ignore_eos": True}
#: Seconds allowed for a placement's blocks to be sent and loaded.
READY_TIMEOUT_S = 240.0

TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp, "
        "a notebook and a flask of tea. From the gallery he watched the fishing boats come home, counted "
        "the gulls on the breakwater and wrote down the colour of the sea. ")


def chat_prompt(tokenizer, n_tokens: int, question: str = "Summarise the story in one paragraph.") -> list[int]:
    """Chat-templated prompt ids of about ``n_tokens`` tokens (never fewer than the template itself):
    the story text repeated, cut at a word so the count comes within a few tokens of ``n_tokens``."""
    words = (TEXT * (n_tokens // 20 + 2)).split()
    lo, hi = 1, len(words)
    while lo < hi:  # the most words whose prompt stays within n_tokens
        mid = (lo + hi + 1) // 2
        ids = tokenizer.encode_chat([{"role": "user", "content": " ".join(words[:mid]) + "\n\n" + question}])
        lo, hi = (mid, hi) if len(ids) <= n_tokens else (lo, mid - 1)
    return tokenizer.encode_chat([{"role": "user", "content": " ".join(words[:lo]) + "\n\n" + question}])


# --------------------------------------------------------------------------- in-process reference


def bench_local(model: LocalModel, ids: list[int], new_tokens: int, repeats: int) -> dict:
    """Median prefill and decode tokens/s of ``model`` (its own pipeline, no network) over ``repeats``
    runs of prompt ``ids`` then ``new_tokens`` greedy tokens; first token from the prefill's logits,
    so ``new_tokens - 1`` decode steps are timed, as in the network runs."""
    pre, dec = [], []
    for r in range(repeats):
        sid = f"local-{r}"
        t = time.perf_counter()
        logits = prefill(model.pipeline, sid, ids)
        pre.append(len(ids) / (time.perf_counter() - t))
        pos, tok = len(ids), int(np.argmax(logits))
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            tok = int(np.argmax(model.pipeline.forward(sid, np.asarray([tok]), pos)[0]))
            pos += 1
        dec.append((new_tokens - 1) / (time.perf_counter() - t))
        model.pipeline.drop_session(sid)
    return {"prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
            "prefill_runs": pre, "decode_runs": dec}


def bench_forward_batch(model: LocalModel, batches: tuple[int, ...], steps: int, prompt_tokens: int = 32) -> dict:
    """Aggregate decode tokens/s of ``Stage.forward_batch`` through the model's one full stage for
    each B in ``batches``: B sessions each prefilled with a ``prompt_tokens``-token prompt, then
    ``steps`` batched decode steps (B rows of 1 token) timed; tokens/s = B * steps / seconds."""
    stage = model.pipeline.stages[0]
    if not (stage.block_range.is_first and stage.block_range.is_last):
        raise ValueError("forward_batch is measured through one full stage; load the model with one stage")
    rng = np.random.default_rng(0)
    out = {}
    for b in batches:
        sids = [f"batch{b}-{i}" for i in range(b)]
        toks = []
        for sid in sids:
            ids = rng.integers(100, model.tokenizer.vocab_size, prompt_tokens)
            toks.append(int(np.argmax(stage.forward(sid, ids, 0, token_ids=ids)[0])))
        pos, t0 = prompt_tokens, 0.0
        for step in range(steps + 1):  # the first step is a warm-up, not timed
            if step == 1:
                t0 = time.perf_counter()
            logits = stage.forward_batch([(sid, pos, [t]) for sid, t in zip(sids, toks)], np.asarray(toks))
            toks, pos = [int(t) for t in np.argmax(logits, axis=-1)], pos + 1
        dt = time.perf_counter() - t0
        out[b] = {"tok_s": b * steps / dt, "step_ms": dt / steps * 1000}
        for sid in sids:
            stage.drop_session(sid)
    return out


# --------------------------------------------------------------------------- network


async def join(admin: DaemonProcess, worker: DaemonProcess, network_id: str) -> None:
    """``worker`` joins ``admin``'s network: token, join request, approval, until it is online."""
    token = (await admin.call("token_issue", network_id=network_id))["token"]
    await worker.call("network_join", token=token)

    async def pending():
        listing = await admin.call("workers_list", network_id=network_id)
        return any(p["node_id"] == worker.node_id for p in listing["pending"])

    await wait_for(pending, timeout=60, what=f"{worker.name}'s join request")
    await admin.call("worker_approve", network_id=network_id, node_id=worker.node_id)

    async def online():
        ws = (await admin.call("workers_list", network_id=network_id))["workers"]
        return any(w["node_id"] == worker.node_id and w["state"] == "online" for w in ws)

    await wait_for(online, timeout=60, what=f"{worker.name} online")


async def apply_and_wait(admin: DaemonProcess, network_id: str, stages: int) -> float:
    """Apply a fresh placement for ``stages`` processes and wait until every stage is loaded.
    Returns the seconds from apply to ready. Raises RuntimeError if the plan has another number
    of stages or a transfer fails."""
    plan = await admin.call("placement_plan", network_id=network_id)
    got = len(plan["placement"]["assignments"])
    if got != stages:
        raise RuntimeError(f"the placement has {got} stage(s), expected {stages}: {plan['rows']}")
    t = time.perf_counter()
    await admin.call("placement_apply", network_id=network_id)

    async def ready():
        st = await admin.call("distribution_status", network_id=network_id)
        failed = [w for w in st["workers"] if w["state"] == "failed"]
        if failed:
            raise RuntimeError(f"block distribution failed: {failed}")
        return st["ready"]

    await wait_for(ready, timeout=READY_TIMEOUT_S, interval=0.2, what="blocks distributed and loaded")
    return time.perf_counter() - t


async def infer(admin: DaemonProcess, network_id: str, key: str, ids: list[int], n: int) -> dict:
    """One greedy answer of ``n`` tokens; returns the client's timings (perf_counter seconds):
    ``start``, ``arrivals`` (one per token), and the final ``usage``."""
    start = time.perf_counter()
    arrivals, usage = [], None
    async for piece in admin.client.infer(network_id, key, ids, len(ids) + n, GREEDY):
        if piece["token_id"] is not None:
            arrivals.append(time.perf_counter())
        if piece["done"]:
            usage = piece["usage"]
    if usage is None or len(arrivals) != n:
        raise RuntimeError(f"answer {key} ended after {len(arrivals)} of {n} tokens (usage {usage})")
    return {"start": start, "arrivals": arrivals, "usage": usage}


async def drop(admin: DaemonProcess, network_id: str, key: str) -> None:
    """Forget conversation ``key`` on every stage (memory and disk), so runs do not pile up sessions."""
    from worker.control import session_id_for

    await admin.call("session_drop", network_id=network_id, session_id=session_id_for(network_id, key))


async def bench_network(admin: DaemonProcess, network_id: str, ids: list[int], new_tokens: int, repeats: int) -> dict:
    """Median prefill tokens/s (server clock), decode tokens/s (client arrivals) and time to first
    token (client) of ``repeats`` answers, each with a fresh conversation key."""
    pre, dec, ttft, cached = [], [], [], []
    await drop_after(admin, network_id, "warm", infer(admin, network_id, "warm", ids[:16], 4))  # first-use costs
    for r in range(repeats):
        key = f"seq-{uuid.uuid4().hex[:12]}"
        res = await infer(admin, network_id, key, ids, new_tokens)
        a, u = res["arrivals"], res["usage"]
        pre.append(u["prompt_tokens"] / (u["prefill_ms"] / 1000))
        dec.append((len(a) - 1) / (a[-1] - a[0]))
        ttft.append((a[0] - res["start"]) * 1000)
        cached.append(u["cached_tokens"])
        await drop(admin, network_id, key)
    return {"prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
            "ttft_ms": statistics.median(ttft), "prefill_runs": pre, "decode_runs": dec, "cached_tokens": cached,
            "stages": u["stages"]}


async def drop_after(admin: DaemonProcess, network_id: str, key: str, run) -> dict:
    """Await ``run`` (an answer for conversation ``key``), then drop that conversation, also on errors."""
    try:
        return await run
    finally:
        await drop(admin, network_id, key)


def aggregate(results: list[dict]) -> dict:
    """Aggregate decode tokens/s of concurrent answers from their arrival times (see the module doc)."""
    firsts = [r["arrivals"][0] for r in results]
    lasts = [r["arrivals"][-1] for r in results]
    decode_tokens = sum(len(r["arrivals"]) - 1 for r in results)
    phase = decode_tokens / (max(lasts) - min(firsts))
    lo, hi = max(firsts), min(lasts)
    inside = sum(1 for r in results for t in r["arrivals"] if lo < t <= hi)
    steady = inside / (hi - lo) if hi > lo and inside >= 3 * len(results) else None
    return {"phase_tok_s": phase, "steady_tok_s": steady, "decode_tokens": decode_tokens,
            "wall_s": max(lasts) - min(r["start"] for r in results)}


async def bench_concurrent(admin: DaemonProcess, network_id: str, tokenizer, sessions: tuple[int, ...],
                           new_tokens: int, repeats: int) -> dict:
    """For each B in ``sessions``: B conversations with distinct keys, prompts computed beforehand,
    then ``new_tokens`` tokens each at once (asyncio.gather). Best of ``repeats`` by phase tok/s."""
    out = {}
    for b in sessions:
        best = None
        for r in range(repeats):
            keys = [f"conc{b}-{r}-{i}-{uuid.uuid4().hex[:8]}" for i in range(b)]
            prompts = [tokenizer.encode_chat([{"role": "user", "content": f"Question {i}: name {i + 2} colours."}])
                       for i in range(b)]
            for k, p in zip(keys, prompts):  # compute each prompt once: the measured run is decode-bound
                await infer(admin, network_id, k, p, 1)
            try:
                results = await asyncio.gather(*(infer(admin, network_id, k, p, new_tokens)
                                                 for k, p in zip(keys, prompts)))
            finally:
                for k in keys:
                    await drop(admin, network_id, k)
            agg = aggregate(results)
            agg["cached_tokens"] = [res["usage"]["cached_tokens"] for res in results]
            if best is None or agg["phase_tok_s"] > best["phase_tok_s"]:
                best = agg
        out[b] = best
    return out


async def run_network(root: Path, ids: list[int], tokenizer, a: argparse.Namespace, reference) -> dict:
    """Start admin, w1, w2; measure 1, 2, 3 processes, each right after ``reference()`` (the
    in-process figures, taken adjacent so that the ratio sees the same machine load); stop them all
    (also on errors)."""
    procs: list[DaemonProcess] = []
    out: dict = {"configs": {}, "concurrent": {}, "ready_s": {}}
    try:
        admin = start_daemon(root / "admin", "admin")
        procs.append(admin)
        network_id = (await admin.call("network_create", name="pipeline bench"))["network"]["network_id"]
        for k in (1, 2, 3):
            if k > 1:
                w = start_daemon(root / f"w{k - 1}", f"w{k - 1}")
                procs.append(w)
                await join(admin, w, network_id)
            out["ready_s"][k] = await apply_and_wait(admin, network_id, k)
            print(f"  {k} process(es): blocks ready in {out['ready_s'][k]:.1f} s", flush=True)
            ref = reference()
            out["configs"][k] = await bench_network(admin, network_id, ids, a.new_tokens, a.repeats)
            out["configs"][k].update(ref=ref, load=os.getloadavg()[0])
            if k in (1, 3):
                out["concurrent"][k] = await bench_concurrent(admin, network_id, tokenizer, a.sessions,
                                                              a.concurrent_tokens, a.concurrent_repeats)
    finally:
        for d in reversed(procs):
            d.stop()
    return out


# --------------------------------------------------------------------------- report


def report(res: dict, a: argparse.Namespace) -> None:
    configs = res["network"]["configs"]
    print()
    print(f"machine          {os.cpu_count()} cores, load average (1/5/15 min) {res['load_before']} at the start, "
          f"{res['load_after']} at the end")
    if a.daemon_env:
        print(f"daemon env       {' '.join(a.daemon_env)} (the in-process reference runs without it)")
    print(f"prompt           {res['prompt_tokens']} tokens (chat template), {a.new_tokens} greedy tokens, "
          f"median of {a.repeats}")
    print()
    print("engine only: Stage.forward_batch, one stage of 30 blocks, B decode rows")
    fb = res["forward_batch"]
    for b, r in fb.items():
        print(f"  B={b:<2} {r['tok_s']:7.1f} tok/s  step {r['step_ms']:6.1f} ms  x{r['tok_s'] / fb[1]['tok_s']:.2f} vs B=1")
    print()
    print("daemons over mTLS on 127.0.0.1 (fresh conversation per repeat), each right after the in-process reference")
    print("  procs  load  | ref prefill  prefill  x ref | ref decode  decode  x ref | step ms  ref step  +ms  | ttft ms")
    steps = {k: 1000 / c["decode_tok_s"] for k, c in configs.items()}
    for k, c in configs.items():
        r = c["ref"]
        ref_step = 1000 / r["decode_tok_s"]
        print(f"  {k:<5}  {c['load']:4.1f}  | {r['prefill_tok_s']:11.0f}  {c['prefill_tok_s']:7.0f}  "
              f"{c['prefill_tok_s'] / r['prefill_tok_s']:5.2f} | {r['decode_tok_s']:10.1f}  {c['decode_tok_s']:6.1f}  "
              f"{c['decode_tok_s'] / r['decode_tok_s']:5.2f} | {steps[k]:7.1f}  {ref_step:8.1f}  "
              f"{steps[k] - ref_step:+5.1f} | {c['ttft_ms']:7.0f}")
    print("  goal: decode >= 0.90 x the single process")
    for k in configs:
        if k > 1:
            print(f"  decode step overhead per added process at {k} processes: "
                  f"{(steps[k] - steps[1]) / (k - 1):.2f} ms ((step_{k} - step_1) / {k - 1})")
    print()
    print(f"concurrent sessions ({a.concurrent_tokens} tokens each, prompt computed beforehand)")
    print("  procs  B   phase tok/s  x B=1   steady tok/s  x B=1   wall s")
    for k, by_b in res["network"]["concurrent"].items():
        one = by_b[min(by_b)]
        for b, r in by_b.items():
            steady = f"{r['steady_tok_s']:12.1f}  {r['steady_tok_s'] / one['steady_tok_s']:5.2f}" \
                if r["steady_tok_s"] and one["steady_tok_s"] else f"{'-':>12}  {'-':>5}"
            print(f"  {k:<5}  {b:<2}  {r['phase_tok_s']:11.1f}  {r['phase_tok_s'] / one['phase_tok_s']:5.2f}   "
                  f"{steady}   {r['wall_s']:6.2f}")
    print("  goal: aggregate at B=8 >= 4 x B=1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, fewer tokens: a smoke run")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrent-tokens", type=int, default=32)
    ap.add_argument("--concurrent-repeats", type=int, default=2)
    ap.add_argument("--sessions", type=lambda s: tuple(int(x) for x in s.split(",")), default=(1, 4, 8))
    ap.add_argument("--batch-steps", type=int, default=16)
    ap.add_argument("--daemon-env", action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable for the daemon processes only (a diagnostic, e.g. "
                         "OPENBLAS_NUM_THREADS=1); repeatable")
    a = ap.parse_args()
    # SIGINT/SIGTERM (also when started in the background, which ignores SIGINT) end the run
    # through KeyboardInterrupt, so the daemons are stopped and the temporary directory removed.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    for kv in a.daemon_env:
        if "=" not in kv:
            ap.error(f"--daemon-env takes KEY=VALUE, got {kv!r}")
    if a.quick:
        a.repeats, a.new_tokens, a.concurrent_tokens, a.concurrent_repeats, a.batch_steps = 1, 16, 12, 1, 4
    if min(a.sessions) != 1:
        a.sessions = (1, *a.sessions)

    res: dict = {"load_before": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    t0 = time.perf_counter()
    model = LocalModel.load()
    ids = chat_prompt(model.tokenizer, a.prompt_tokens)
    res["prompt_tokens"] = len(ids)
    print(f"reference: {model.display_name}, prompt {len(ids)} tokens", flush=True)
    res["forward_batch"] = bench_forward_batch(model, tuple(sorted(set(a.sessions))), a.batch_steps)
    print("daemons:", flush=True)
    saved_env = dict(os.environ)
    os.environ.update(kv.split("=", 1) for kv in a.daemon_env)  # start_daemon passes os.environ on
    res["daemon_env"] = a.daemon_env
    try:
        with tempfile.TemporaryDirectory(prefix="argus-bench-pipeline-") as tmp:
            res["network"] = asyncio.run(run_network(Path(tmp), ids, model.tokenizer, a,
                                                     lambda: bench_local(model, ids, a.new_tokens, a.repeats)))
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    res["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    res["total_s"] = time.perf_counter() - t0
    report(res, a)
    print(f"\ntotal {res['total_s']:.0f} s")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
