"""Quantized-weight kernels against float32 BLAS over SmolLM2's real weights.

    python bench/quant.py [--repeats 7] [--batch 8] [--prompt-tokens 200]

Loads SmolLM2-135M-Instruct's GGUF (30 blocks' attn_q/k/v/output and ffn_gate/up/down, Q4_1 as
stored, plus the tied output head token_embd 49152×576, stored as Q8_0) and prints, from one run:
  * one decode-equivalent pass (every weight matrix times one activation vector, the head included)
    with the fused kernels (``worker.engine.quant.matmul``) and with NumPy/BLAS on the f32 weights
    dequantized in the same run: ms per pass, tokens/s-equivalent (1 / pass), ratio; the head alone;
  * batched decode: one pass with ``--batch`` activation rows against ``--batch`` one-row passes,
    and the aggregate speed-up over one row;
  * a prefill-equivalent pass (``--prompt-tokens`` rows): tiles dequantized into a scratch buffer
    + BLAS against BLAS on f32;
  * resident memory (psutil RSS) of the quantized weights (the memory-mapped file's pages, touched)
    and of the f32 copies, with their nominal sizes;
  * if ``llama_cpp`` is importable, llama.cpp's decode speed on the same file (skipped otherwise).
Timings are medians of ``--repeats`` passes after one warm-up pass (wall clock, plus the process's
CPU time over all threads, which other processes' load disturbs less); the first kernel compilation
(or cache load) is timed separately. Results go into docs/PERFORMANCE.md by hand.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.engine.gguf_file import ModelFile, default_model_path  # noqa: E402

MATS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
MB = 1e6


def rss() -> int:
    return psutil.Process().memory_info().rss


CPU_MS: dict[str, float] = {}  # label -> median CPU ms (all threads) per pass, filled by median_ms


def median_ms(fn, repeats: int, label: str = "") -> float:
    """Median wall-clock ms of ``repeats`` calls after one warm-up; the median process CPU ms goes to CPU_MS[label]."""
    fn()
    times, cpu = [], []
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    CPU_MS[label] = statistics.median(cpu) * 1e3
    return statistics.median(times) * 1e3


def bench_llama_cpp(path: str, new_tokens: int = 64) -> float | None:
    """llama.cpp's greedy decode tokens/s on ``path`` (2 threads), or None when ``llama_cpp`` is absent."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_ctx=256, n_threads=os.cpu_count(), verbose=False)
    llm.eval([1, 2, 3, 4])
    t = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return new_tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    a = ap.parse_args()

    t = time.perf_counter()
    from worker.engine import quant

    quant.warm_up()
    print(f"kernel import + compile/cache load: {time.perf_counter() - t:.1f} s")

    mf = ModelFile(default_model_path())
    tensors = {t.name: t for t in mf.reader.tensors}
    names = [f"blk.{i}.{m}.weight" for i in range(mf.config.n_block) for m in MATS] + ["token_embd.weight"]
    r0 = rss()
    qms = [quant.QuantizedMatrix.from_gguf(tensors[n]) for n in names]
    for qm in qms:  # fault the file's pages in, as a decode pass does
        int(qm.data.sum(dtype=np.uint64))
    r1 = rss()
    f32 = [quant.dequantize(qm) for qm in qms]
    r2 = rss()
    q_bytes, f_bytes = sum(q.nbytes for q in qms), sum(f.nbytes for f in f32)
    types = sorted({q.ggml_type.name for q in qms})
    print(f"{len(qms)} matrices ({', '.join(types)}), file {os.path.getsize(mf.path) / MB:.1f} MB")
    print(f"resident: quantized {q_bytes / MB:.1f} MB nominal, RSS +{(r1 - r0) / MB:.1f} MB;"
          f" f32 {f_bytes / MB:.1f} MB nominal, RSS +{(r2 - r1) / MB:.1f} MB  (f32 / quantized {f_bytes / q_bytes:.2f}x)")

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(q.shape[1], dtype=np.float32) for q in qms]
    Xs = [rng.standard_normal((a.batch, q.shape[1]), dtype=np.float32) for q in qms]
    Ps = {n_in: rng.standard_normal((a.prompt_tokens, n_in), dtype=np.float32) for n_in in {q.shape[1] for q in qms}}

    def q_pass():
        for qm, x in zip(qms, xs):
            quant.matmul(qm, x)

    def f_pass():
        for w, x in zip(f32, xs):
            w @ x

    def q_batch():
        for qm, X in zip(qms, Xs):
            quant.matmul(qm, X)

    def q_rows():
        for qm, X in zip(qms, Xs):
            for row in X:
                quant.matmul(qm, row)

    def f_batch():
        for w, X in zip(f32, Xs):
            X @ w.T

    def q_prefill():
        for qm in qms:
            quant.matmul(qm, Ps[qm.shape[1]])

    def f_prefill():
        for w in f32:
            Ps[w.shape[1]] @ w.T

    head_q, head_f, head_x = qms[-1], f32[-1], xs[-1]
    runs = {
        "q": (q_pass, a.repeats), "f": (f_pass, a.repeats),
        "hq": (lambda: quant.matmul(head_q, head_x), a.repeats), "hf": (lambda: head_f @ head_x, a.repeats),
        "qb": (q_batch, a.repeats), "qr": (q_rows, max(1, a.repeats // 2)), "fb": (f_batch, a.repeats),
        "qp": (q_prefill, 3), "fp": (f_prefill, 3),
    }
    ms = {k: median_ms(fn, n, k) for k, (fn, n) in runs.items()}
    tps = lambda m: 1e3 / m  # noqa: E731
    print(f"decode pass: quantized {ms['q']:.2f} ms ({tps(ms['q']):.1f} tok/s-eq), f32 BLAS {ms['f']:.2f} ms"
          f" ({tps(ms['f']):.1f} tok/s-eq); ratio quantized/f32 speed {ms['f'] / ms['q']:.2f}")
    print(f"  head {head_q.ggml_type.name} {head_q.shape[0]}x{head_q.shape[1]}: quantized {ms['hq']:.2f} ms, f32 {ms['hf']:.2f} ms")
    print(f"batched decode ({a.batch} rows): one pass {ms['qb']:.2f} ms vs {a.batch} one-row passes {ms['qr']:.2f} ms"
          f" -> aggregate {a.batch * ms['q'] / ms['qb']:.2f}x one row ({a.batch * 1e3 / ms['qb']:.1f} tok/s-eq);"
          f" f32 BLAS gemm {ms['fb']:.2f} ms ({a.batch * ms['f'] / ms['fb']:.2f}x)")
    print(f"prefill pass ({a.prompt_tokens} rows): tiles + BLAS {ms['qp']:.1f} ms"
          f" ({a.prompt_tokens * 1e3 / ms['qp']:.0f} tok/s-eq), f32 BLAS {ms['fp']:.1f} ms; ratio {ms['fp'] / ms['qp']:.2f}")
    print("CPU ms per pass (all threads; less sensitive to other load than wall time): "
          + ", ".join(f"{k} {v:.1f}" for k, v in CPU_MS.items())
          + "  [q/f: decode quantized/f32, hq/hf: head, qb/qr/fb: batched / row by row / f32 gemm, qp/fp: prefill]")
    ref = bench_llama_cpp(mf.path)
    if ref is None:
        print("llama_cpp not importable: no llama.cpp reference in this run")
    else:
        print(f"llama.cpp decode {ref:.1f} tok/s (whole model); quantized matmul pass / llama.cpp {tps(ms['q']) / ref:.2f}")


if __name__ == "__main__":
    main()
