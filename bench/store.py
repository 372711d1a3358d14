"""Store benchmark: append and page latency of the message store as it grows.

    python bench/store.py [--sizes 10000,100000,1000000] [--samples 2000] [--mongo-uri URI]

One database grows through each size in ``--sizes`` (messages in total). The base is filled
fast, straight into SQLite with ``executemany`` (``--fill api`` fills through the Store API
instead, as the MongoDB run does): ``--per-conversation`` messages per conversation, spread over
``--users`` users, plus one long conversation holding ``--long-share`` of all messages. At each
size it then times, through the Store API only (``argus.store.SQLiteStore``):

  * append       ``add_message`` into a random conversation (one write transaction each);
  * first page   ``list_messages(limit=50)`` of a random conversation (its newest messages);
  * cursor page  the page after that one, via ``next_cursor``;
  * deep page    a page in the deepest tenth of the long conversation, via a cursor collected
                 by paging through it first (keyset paging: the cost should not grow with depth).

Reference, measured in the same run on the same file, interleaved sample by sample with the
store's operations: a raw ``sqlite3`` connection with the store's pragmas doing a single-row
INSERT + COMMIT (for append) and the bare indexed SELECT of one page (for the listings; after a
cursor it seeks with the row value ``(created_at, id) < (?, ?)``, which the index answers
directly whatever the depth). The ratio store ÷ raw is everything the store adds: ownership
check, transaction, records, and its choice of SQL.
Latencies are p50 / p99 in milliseconds over ``--samples`` operations each. The goal is
p99 ≤ 5 ms at 1M messages.

``--mongo-uri`` runs the same measurements against ``argus.store.mongo.MongoStore``
(filled through the Store API, in a scratch database that is dropped afterwards; the
reference there is a raw pymongo insert_one and an indexed find on a scratch collection).
Results go into docs/PERFORMANCE.md by hand.

    python bench/store.py --loop-lag [--lag-users 8] [--lag-seconds 5] [--lag-base 10000]

``--loop-lag`` instead measures what the store costs the *event loop* (the chat server runs
every session on one asyncio loop). A ticker coroutine sleeps 1 ms in a loop and records how
late it wakes (scheduling lag). Three phases of ``--lag-seconds`` each, on one SQLiteStore
with ``--lag-base`` messages: *idle* (the ticker alone: the floor of the timer itself), then
``--lag-users`` simulated users, each appending a message and reading the first page of its
own conversation in a tight loop, (a) through ``asyncio.to_thread`` (what Argus does) and
(b) calling the store directly on the loop (blocking; the reference). Printed: lag p50 / p99 /
max in ms per phase, the lag ratio blocking ÷ to_thread, and store operations per second
(append and page each count as one). SQLite only: mongomock runs in Python under the GIL and
says nothing about a server's latency; a MongoDB figure needs a real server.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from argus.store import SQLiteStore, Store
from argus.store.sqlite import DB_NAME

PAGE = 50
GOAL_P99_MS = 5.0
WORDS = ("the", "model", "answers", "in", "a", "few", "words", "while", "user", "asks", "about", "weather",
         "rivers", "code", "history", "numbers", "and", "capital", "of", "France", "سلام", "حالت", "چطوره")


# ---------------------------------------------------------------- data
def _text(rng: random.Random) -> str:
    """A chat message of 5–60 words (about 30–400 characters)."""
    return " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))


@dataclass
class Corpus:
    """What the database holds so far; the fill functions extend it."""

    users: list[str] = field(default_factory=list)
    convs: list[tuple[str, str]] = field(default_factory=list)  # (conversation_id, owner_id), regular ones
    long_conv: tuple[str, str] | None = None
    long_count: int = 0
    messages: int = 0
    clock: float = 0.0  # created_at of the last bulk-inserted message


def ensure_users(store: Store, corpus: Corpus, n_users: int) -> None:
    for i in range(len(corpus.users), n_users):
        corpus.users.append(store.create_user(f"bench{i}@example.com", f"Bench {i}", "x" * 60, role="user").id)


def _plan(corpus: Corpus, target: int, per_conv: int, long_share: float) -> tuple[int, int]:
    """How many messages to add to the long conversation and to new regular ones to reach ``target``."""
    add = target - corpus.messages
    long_add = max(0, min(add, int(target * long_share) - corpus.long_count))
    return long_add, add - long_add


def bulk_fill_sqlite(store: SQLiteStore, corpus: Corpus, target: int, per_conv: int, long_share: float,
                     rng: random.Random) -> None:
    """Grow the SQLite database to ``target`` messages with executemany (not timed as an operation)."""
    long_add, regular = _plan(corpus, target, per_conv, long_share)
    conn = sqlite3.connect(store.db_path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    if corpus.clock == 0.0:
        corpus.clock = time.time() - 3e7  # well before "now", so the measured appends sort last
    step = 1e-3
    try:
        conn.execute("BEGIN")
        if corpus.long_conv is None:
            cid, owner = uuid.uuid4().hex, corpus.users[0]
            conn.execute("INSERT INTO conversations (id, owner_id, title, model, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                         (cid, owner, "the long one", "bench", corpus.clock, corpus.clock))
            corpus.long_conv = (cid, owner)
        new_convs: list[tuple] = []
        msgs: list[tuple] = []

        def add_messages(cid: str, owner: str, n: int) -> None:
            for j in range(n):
                corpus.clock += step
                msgs.append((uuid.uuid4().hex, cid, owner, "user" if j % 2 == 0 else "assistant",
                             _text(rng), "complete", "bench", corpus.clock, "[]"))
                if len(msgs) >= 50_000:
                    flush()

        def flush() -> None:
            conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", msgs)
            msgs.clear()

        lcid, lowner = corpus.long_conv
        add_messages(lcid, lowner, long_add)
        conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (corpus.clock, lcid))
        corpus.long_count += long_add
        while regular > 0:
            n = min(per_conv, regular)
            cid = uuid.uuid4().hex
            owner = corpus.users[len(corpus.convs) % len(corpus.users)]
            start = corpus.clock
            add_messages(cid, owner, n)
            new_convs.append((cid, owner, f"conversation {len(corpus.convs)}", "bench", start, corpus.clock))
            corpus.convs.append((cid, owner))
            regular -= n
        flush()
        conn.executemany("INSERT INTO conversations (id, owner_id, title, model, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)", new_convs)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    corpus.messages = target


def api_fill(store: Store, corpus: Corpus, target: int, per_conv: int, long_share: float,
             rng: random.Random) -> None:
    """Grow any Store to ``target`` messages through its public API (slow; any backend)."""
    long_add, regular = _plan(corpus, target, per_conv, long_share)
    if corpus.long_conv is None:
        corpus.long_conv = (store.create_conversation(corpus.users[0], "the long one", "bench").id, corpus.users[0])
    lcid, lowner = corpus.long_conv
    for j in range(long_add):
        store.add_message(lcid, lowner, "user" if j % 2 == 0 else "assistant", _text(rng), model="bench")
    corpus.long_count += long_add
    while regular > 0:
        n = min(per_conv, regular)
        owner = corpus.users[len(corpus.convs) % len(corpus.users)]
        cid = store.create_conversation(owner, f"conversation {len(corpus.convs)}", "bench").id
        for j in range(n):
            store.add_message(cid, owner, "user" if j % 2 == 0 else "assistant", _text(rng), model="bench")
        corpus.convs.append((cid, owner))
        regular -= n
    corpus.messages = target


# ---------------------------------------------------------------- references
class RawSQLite:
    """The floor for the same work: one sqlite3 connection with the store's pragmas."""

    name = "raw sqlite3"

    def __init__(self, db_path: Path):
        self.conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        for pragma in ("busy_timeout=5000", "foreign_keys=ON", "synchronous=NORMAL"):
            self.conn.execute(f"PRAGMA {pragma}")
        self.cols = "id, conversation_id, owner_id, role, content, status, model, created_at, attachment_ids"

    def append(self, cid: str, owner: str, content: str) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute(f"INSERT INTO messages ({self.cols}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (uuid.uuid4().hex, cid, owner, "user", content, "complete", "bench", time.time(), "[]"))
        self.conn.execute("COMMIT")

    def page(self, cid: str, owner: str, before: tuple[float, str] | None) -> None:
        sql = f"SELECT {self.cols} FROM messages WHERE conversation_id = ?"
        args: list = [cid]
        if before:  # a row-value comparison: the index seeks straight to the cursor
            sql += " AND (created_at, id) < (?, ?)"
            args += [before[0], before[1]]
        self.conn.execute(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", (*args, PAGE + 1)).fetchall()

    def close(self) -> None:
        self.conn.close()


class RawMongo:
    """The floor for MongoDB: pymongo insert_one and an indexed find on a scratch collection."""

    name = "raw pymongo"

    def __init__(self, db):
        self.coll = db["bench_reference"]
        self.coll.create_index([("conversation_id", 1), ("created_at", -1), ("_id", -1)])

    def append(self, cid: str, owner: str, content: str) -> None:
        self.coll.insert_one({"_id": uuid.uuid4().hex, "conversation_id": cid, "owner_id": owner, "role": "user",
                              "content": content, "status": "complete", "model": "bench",
                              "created_at": time.time(), "attachment_ids": []})

    def page(self, cid: str, owner: str, before: tuple[float, str] | None) -> None:
        query: dict = {"conversation_id": cid}
        if before:
            query["$or"] = [{"created_at": {"$lt": before[0]}}, {"created_at": before[0], "_id": {"$lt": before[1]}}]
        list(self.coll.find(query).sort([("created_at", -1), ("_id", -1)]).limit(PAGE + 1))

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- measuring
def _ms(samples: list[float]) -> tuple[float, float]:
    qs = statistics.quantiles(samples, n=100, method="inclusive")
    return qs[49] * 1e3, qs[98] * 1e3


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@dataclass
class Row:
    size: int
    op: str
    p50: float
    p99: float
    ref_p50: float
    ref_p99: float


def measure(store: Store, ref, corpus: Corpus, size: int, samples: int, rng: random.Random) -> list[Row]:
    """Time each operation ``samples`` times, alternating with the reference's matching operation."""
    pairs: dict[str, tuple[list[float], list[float]]] = {}

    def run(op: str, store_fn: Callable[[], object], ref_fn: Callable[[], object]) -> object:
        """Time one store call and one reference call, in random order; return the store's result."""
        s, r = pairs.setdefault(op, ([], []))
        if rng.random() < 0.5:  # neither side always goes first
            t = time.perf_counter()
            out = store_fn()
            s.append(time.perf_counter() - t)
            r.append(_timed(ref_fn))
        else:
            r.append(_timed(ref_fn))
            t = time.perf_counter()
            out = store_fn()
            s.append(time.perf_counter() - t)
        return out

    # Cursors into the deepest tenth of the long conversation, collected by paging through it.
    lcid, lowner = corpus.long_conv
    cursors: list[tuple[str, tuple[float, str]]] = []
    page = store.list_messages(lcid, lowner, limit=PAGE)
    while page.next_cursor:
        last = page.items[-1]
        cursors.append((page.next_cursor, (last.created_at, last.id)))
        page = store.list_messages(lcid, lowner, limit=PAGE, cursor=page.next_cursor)
    if not cursors:
        raise SystemExit(f"the long conversation has only {corpus.long_count} messages: raise --long-share")
    deep = cursors[-max(1, len(cursors) // 10):]

    warmup = min(50, samples)
    for i in range(warmup + samples):
        if i == warmup:
            pairs.clear()
        cid, owner = rng.choice(corpus.convs)
        text = _text(rng)
        run("append", partial(store.add_message, cid, owner, "user", text, model="bench"),
            partial(ref.append, cid, owner, text))
        cid, owner = rng.choice(corpus.convs)
        first = run("first page", partial(store.list_messages, cid, owner, limit=PAGE),
                    partial(ref.page, cid, owner, None))
        if first.next_cursor:
            last = first.items[-1]
            run("cursor page", partial(store.list_messages, cid, owner, limit=PAGE, cursor=first.next_cursor),
                partial(ref.page, cid, owner, (last.created_at, last.id)))
        cursor, before = rng.choice(deep)
        run("deep page", partial(store.list_messages, lcid, lowner, limit=PAGE, cursor=cursor),
            partial(ref.page, lcid, lowner, before))
    rows = []
    for op, (s, r) in pairs.items():
        rows.append(Row(size, op, *_ms(s), *_ms(r)))
    return rows


def print_rows(title: str, ref_name: str, rows: list[Row]) -> None:
    print(f"\n{title} (p50 / p99 in ms; reference: {ref_name}, same run, same file)")
    head = f"{'messages':>10}  {'operation':<12} {'p50':>7} {'p99':>7}   {'ref p50':>7} {'ref p99':>7}   {'÷ref p50':>8} {'÷ref p99':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.size:>10,}  {r.op:<12} {r.p50:>7.3f} {r.p99:>7.3f}   {r.ref_p50:>7.3f} {r.ref_p99:>7.3f}"
              f"   {r.p50 / r.ref_p50:>8.2f} {r.p99 / r.ref_p99:>8.2f}")


def verdict(rows: list[Row]) -> None:
    top = max(r.size for r in rows)
    worst = max((r for r in rows if r.size == top), key=lambda r: r.p99)
    ok = worst.p99 <= GOAL_P99_MS
    print(f"goal p99 <= {GOAL_P99_MS:g} ms at {top:,} messages: {'met' if ok else 'NOT met'} "
          f"(worst: {worst.op}, p99 {worst.p99:.3f} ms)")


# ---------------------------------------------------------------- runs
def run_sqlite(args, sizes: list[int]) -> list[Row]:
    rng = random.Random(args.seed)
    root = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="argus-bench-store-"))
    if args.data_dir and (root / DB_NAME).exists():
        raise SystemExit(f"{root / DB_NAME} exists: give an empty --data-dir")
    store = SQLiteStore(root)
    ref = RawSQLite(store.db_path)
    corpus = Corpus()
    rows: list[Row] = []
    try:
        ensure_users(store, corpus, args.users)
        for size in sizes:
            t = time.perf_counter()
            fill = bulk_fill_sqlite if args.fill == "bulk" else api_fill
            fill(store, corpus, size, args.per_conversation, args.long_share, rng)
            fill_s = time.perf_counter() - t
            t = time.perf_counter()
            size_rows = measure(store, ref, corpus, size, args.samples, rng)
            db_mb = sum(p.stat().st_size for p in root.glob(DB_NAME + "*")) / 1e6
            print(f"[sqlite] {size:,} messages in {len(corpus.convs) + 1:,} conversations of {len(corpus.users)} "
                  f"users ({corpus.long_count:,} in the long one): {args.fill} fill {fill_s:.1f} s, "
                  f"measured in {time.perf_counter() - t:.1f} s, database {db_mb:.0f} MB", flush=True)
            rows += size_rows
    finally:
        ref.close()
        store.close()
        if not args.data_dir and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def _mongo_store_class():
    try:
        module = importlib.import_module("argus.store.mongo")
    except ModuleNotFoundError as exc:
        if exc.name not in ("argus.store.mongo",):
            raise
        return None
    return getattr(module, "MongoStore", None)


def run_mongo(args, sizes: list[int]) -> list[Row] | None:
    cls = _mongo_store_class()
    if cls is None:
        print("\n[mongo] skipped: argus.store has no MongoStore yet (argus/store/mongo.py); "
              "rerun with --mongo-uri once it exists.")
        return None
    from urllib.parse import urlsplit, urlunsplit

    import pymongo  # a dependency of MongoStore

    parts = urlsplit(args.mongo_uri)
    db_name = f"argus_bench_{uuid.uuid4().hex[:8]}"
    uri = urlunsplit(parts._replace(path="/" + db_name))
    client = pymongo.MongoClient(uri)
    data_dir = Path(tempfile.mkdtemp(prefix="argus-bench-mongo-"))
    store = cls.from_uri(uri, db_name)  # as open_store() does
    ref = RawMongo(client[db_name])
    rng = random.Random(args.seed)
    corpus = Corpus()
    rows: list[Row] = []
    try:
        ensure_users(store, corpus, args.users)
        for size in sizes:
            t = time.perf_counter()
            api_fill(store, corpus, size, args.per_conversation, args.long_share, rng)
            fill_s = time.perf_counter() - t
            rows += measure(store, ref, corpus, size, args.samples, rng)
            print(f"[mongo] {size:,} messages: api fill {fill_s:.1f} s", flush=True)
    finally:
        store.close()
        client.drop_database(db_name)
        client.close()
        shutil.rmtree(data_dir, ignore_errors=True)
    return rows


# ---------------------------------------------------------------- event-loop lag
TICK_S = 0.001


@dataclass
class LagRow:
    phase: str
    ticks: int
    lag_p50: float  # ms
    lag_p99: float
    lag_max: float
    ops: int = 0
    seconds: float = 0.0
    op_p50: float = 0.0  # ms, one store call as the simulated user waits for it
    op_p99: float = 0.0

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0


async def _lag_phase(phase: str, store: Store, convs: list[tuple[str, str]], seconds: float,
                     mode: str | None, rng: random.Random) -> LagRow:
    """Run the 1 ms ticker for ``seconds``, with one simulated user per conversation in
    ``convs`` doing append + first page in a loop (``mode`` "thread": via asyncio.to_thread;
    "blocking": called on the loop; None: no users)."""
    stop = asyncio.Event()
    lags: list[float] = []
    op_times: list[float] = []
    ops = 0

    async def ticker() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(TICK_S)
            lags.append(time.perf_counter() - t - TICK_S)

    async def call(fn, *args, **kwargs):
        t = time.perf_counter()
        if mode == "thread":
            out = await asyncio.to_thread(fn, *args, **kwargs)
        else:
            out = fn(*args, **kwargs)
        op_times.append(time.perf_counter() - t)
        await asyncio.sleep(0)  # a handler awaits something between store calls (sending, etc.)
        return out

    async def user(cid: str, owner: str) -> None:
        nonlocal ops
        texts = [_text(rng) for _ in range(64)]
        i = 0
        while not stop.is_set():
            await call(store.add_message, cid, owner, "user", texts[i % 64], model="bench")
            await call(store.list_messages, cid, owner, limit=PAGE)
            ops += 2
            i += 1

    tasks = [asyncio.create_task(ticker())]
    if mode is not None:
        tasks += [asyncio.create_task(user(cid, owner)) for cid, owner in convs]
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - start
    await asyncio.gather(*tasks)
    qs = statistics.quantiles(lags, n=100, method="inclusive")
    row = LagRow(phase, len(lags), qs[49] * 1e3, qs[98] * 1e3, max(lags) * 1e3, ops, elapsed)
    if op_times:
        oq = statistics.quantiles(op_times, n=100, method="inclusive")
        row.op_p50, row.op_p99 = oq[49] * 1e3, oq[98] * 1e3
    return row


def run_loop_lag(args) -> list[LagRow]:
    rng = random.Random(args.seed)
    root = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="argus-bench-lag-"))
    if args.data_dir and (root / DB_NAME).exists():
        raise SystemExit(f"{root / DB_NAME} exists: give an empty --data-dir")
    store = SQLiteStore(root)
    corpus = Corpus()
    try:
        ensure_users(store, corpus, args.lag_users)
        bulk_fill_sqlite(store, corpus, max(args.lag_base, 2 * args.per_conversation), args.per_conversation,
                         args.long_share, rng)
        convs, owners = [], set()  # one conversation of each simulated user, each a different owner
        for cid, owner in corpus.convs:
            if owner not in owners:
                owners.add(owner)
                convs.append((cid, owner))
        convs = convs[:args.lag_users]
        print(f"[loop lag] SQLiteStore with {corpus.messages:,} messages; {len(convs)} simulated users "
              f"(append + first page of {PAGE}, in a loop); ticker every {TICK_S * 1e3:g} ms; "
              f"{args.lag_seconds:g} s per phase; default executor "
              f"{min(32, (os.cpu_count() or 1) + 4)} threads", flush=True)

        async def phases() -> list[LagRow]:
            rows = [await _lag_phase("idle (ticker only)", store, convs, args.lag_seconds, None, rng)]
            rows.append(await _lag_phase("asyncio.to_thread", store, convs, args.lag_seconds, "thread", rng))
            rows.append(await _lag_phase("blocking on the loop", store, convs, args.lag_seconds, "blocking", rng))
            return rows

        return asyncio.run(phases())
    finally:
        store.close()
        if not args.data_dir and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def print_lag(rows: list[LagRow]) -> None:
    print("\nEvent-loop lag under store load (ms late per 1 ms tick; store ops = appends + first pages)")
    head = (f"{'phase':<22} {'ticks':>6} {'lag p50':>8} {'lag p99':>8} {'lag max':>8}   "
            f"{'ops/s':>7} {'op p50':>7} {'op p99':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ops = f"{r.ops_per_s:>7.0f} {r.op_p50:>7.3f} {r.op_p99:>7.3f}" if r.ops else f"{'-':>7} {'-':>7} {'-':>7}"
        print(f"{r.phase:<22} {r.ticks:>6} {r.lag_p50:>8.3f} {r.lag_p99:>8.3f} {r.lag_max:>8.3f}   {ops}")
    by = {r.phase: r for r in rows}
    thread, block = by["asyncio.to_thread"], by["blocking on the loop"]
    print(f"lag ratio blocking ÷ to_thread: p50 {block.lag_p50 / thread.lag_p50:.1f}x, "
          f"p99 {block.lag_p99 / thread.lag_p99:.1f}x, max {block.lag_max / thread.lag_max:.1f}x; "
          f"store throughput to_thread ÷ blocking: {thread.ops_per_s / block.ops_per_s:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="message counts, comma-separated, ascending")
    ap.add_argument("--samples", type=int, default=2000, help="timed operations per kind and size")
    ap.add_argument("--per-conversation", type=int, default=100)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--long-share", type=float, default=0.1, help="share of messages in the one long conversation")
    ap.add_argument("--fill", choices=("bulk", "api"), default="bulk", help="how the SQLite base is built")
    ap.add_argument("--data-dir", help="an empty directory for the SQLite database (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary database")
    ap.add_argument("--mongo-uri", help="also benchmark MongoStore on this server (scratch database, dropped)")
    ap.add_argument("--no-sqlite", action="store_true", help="only the MongoDB run")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--loop-lag", action="store_true",
                    help="measure event-loop lag under store load (to_thread vs blocking) instead")
    ap.add_argument("--lag-users", type=int, default=8, help="simulated users for --loop-lag")
    ap.add_argument("--lag-seconds", type=float, default=5.0, help="length of each --loop-lag phase")
    ap.add_argument("--lag-base", type=int, default=10_000, help="messages in the database for --loop-lag")
    args = ap.parse_args(argv)
    if args.loop_lag:
        print(f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs", flush=True)
        rows = run_loop_lag(args)
        print_lag(rows)
        if args.json:
            Path(args.json).write_text(json.dumps({"loop_lag": [{**vars(r), "ops_per_s": r.ops_per_s} for r in rows]},
                                                  indent=1))
        return 0
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    if sizes != sorted(sizes) or sizes[0] < args.per_conversation * 2:
        ap.error("--sizes must be ascending and hold at least two conversations' worth of messages")
    if args.samples < 100:
        ap.error("--samples must be at least 100 for a p99")

    print(f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs; "
          f"page size {PAGE}, {args.samples} samples per operation", flush=True)
    results: dict[str, list[Row]] = {}
    if not args.no_sqlite:
        results["sqlite"] = run_sqlite(args, sizes)
        print_rows("SQLiteStore", RawSQLite.name, results["sqlite"])
        verdict(results["sqlite"])
    if args.mongo_uri:
        rows = run_mongo(args, sizes)
        if rows:
            results["mongo"] = rows
            print_rows("MongoStore", RawMongo.name, rows)
            verdict(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({k: [vars(r) for r in v] for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
