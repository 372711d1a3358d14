"""Engine benchmark: prefill and decode speed against the machine's memory bandwidth.

    python bench/engine.py [--prompt-tokens 200] [--new-tokens 128] [--repeats 3]

Prints, from one run on this machine:
  * prefill tokens/s for a ``--prompt-tokens`` prompt, decode tokens/s over ``--new-tokens`` steps (medians);
  * read bandwidth (GB/s) by three probes over a 1 GiB f32 buffer — NumPy sum on one thread,
    sums on two threads, and a BLAS matrix-vector product (the decode access pattern) —
    each the median of 5; the ceiling uses the best of them, since decode's BLAS calls use
    every core;
  * the f32 decode ceiling = best bandwidth / weight bytes read per token, and decode / ceiling;
  * if ``llama_cpp`` is importable, llama.cpp's speeds on the same GGUF and our ratio to them.
Decode is greedy through the whole chain and does not stop at end-of-turn, so every run
decodes exactly ``--new-tokens`` tokens. Results go into docs/PERFORMANCE.md by hand.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.engine import LocalModel  # noqa: E402


def read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """Read-only memory bandwidth in bytes/s by probe name; each the median of ``repeats`` passes
    over an ``n_bytes`` f32 buffer (far larger than any cache)."""
    buf = np.ones(n_bytes // 4, dtype=np.float32)
    buf.sum()  # fault pages in
    halves = np.array_split(buf, 2)
    side = int(np.sqrt(buf.size))
    mat, vec = buf[: side * side].reshape(side, side), np.ones(side, np.float32)

    def two_threads() -> None:
        ts = [threading.Thread(target=h.sum) for h in halves]  # NumPy reductions release the GIL
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    probes = {"sum, 1 thread": (buf.sum, buf.nbytes), "sum, 2 threads": (two_threads, buf.nbytes),
              "BLAS gemv": (lambda: mat @ vec, mat.nbytes)}
    out = {}
    for name, (fn, nbytes) in probes.items():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = nbytes / statistics.median(times)
    return out


def bench_engine(model: LocalModel, prompt_tokens: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    """Median (prefill tok/s, decode tok/s) over ``repeats`` runs."""
    rng = np.random.default_rng(0)
    ids = rng.integers(100, model.tokenizer.vocab_size, prompt_tokens)
    pre, dec = [], []
    for r in range(repeats):
        sid = f"bench{r}"
        t = time.perf_counter()
        logits = model.pipeline.forward(sid, ids, 0)[0]
        pre.append(prompt_tokens / (time.perf_counter() - t))
        pos = prompt_tokens
        t = time.perf_counter()
        for _ in range(new_tokens):
            logits = model.pipeline.forward(sid, np.array([int(np.argmax(logits))]), pos)[0]
            pos += 1
        dec.append(new_tokens / (time.perf_counter() - t))
        model.pipeline.drop_session(sid)
    return statistics.median(pre), statistics.median(dec)


def bench_llama_cpp(path: str, prompt_tokens: int, new_tokens: int) -> tuple[float, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_ctx=prompt_tokens + new_tokens + 8, n_threads=os.cpu_count(), verbose=False)
    ids = list(np.random.default_rng(0).integers(100, 49000, prompt_tokens))
    t = time.perf_counter()
    llm.eval(ids)
    pre = prompt_tokens / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return pre, new_tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--blocks-per-stage", type=int, default=None)
    a = ap.parse_args()

    t = time.perf_counter()
    model = LocalModel.load(blocks_per_stage=a.blocks_per_stage)
    load_s = time.perf_counter() - t
    stages = model.pipeline.stages
    # weight bytes touched per decoded token: every block, the final norm and the (tied) output head;
    # the embedding row lookup is negligible.
    per_token = sum(b.nbytes for s in stages for b in s.blocks) + stages[-1].output.nbytes + stages[-1].output_norm.nbytes
    pre, dec = bench_engine(model, a.prompt_tokens, a.new_tokens, a.repeats)
    probes = read_bandwidth()
    bw = max(probes.values())
    ceiling = bw / per_token
    print(f"model           {model.display_name}  ({len(stages)} stage(s), loaded in {load_s:.1f} s)")
    print(f"weights/token   {per_token / 1e6:.1f} MB (f32)")
    print("read bandwidth  " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in probes.items()) + f" GB/s -> best {bw / 1e9:.1f}")
    print(f"prefill         {pre:.0f} tok/s  ({a.prompt_tokens}-token prompt)")
    print(f"decode          {dec:.1f} tok/s  ({a.new_tokens} tokens)")
    print(f"f32 ceiling     {ceiling:.1f} tok/s   decode/ceiling = {dec / ceiling:.2f}  (target >= 0.90)")
    ref = bench_llama_cpp(model.file.path, a.prompt_tokens, a.new_tokens)
    if ref is None:
        print("llama.cpp       not importable (pip install llama-cpp-python to compare)")
    else:
        print(f"llama.cpp       prefill {ref[0]:.0f} tok/s, decode {ref[1]:.1f} tok/s")
        print(f"ratio vs llama.cpp  prefill {pre / ref[0]:.2f}, decode {dec / ref[1]:.2f}")


if __name__ == "__main__":
    main()
