"""Which sampling settings give the local model's best answers: a small fixed question set.

    python bench/local_defaults.py [--seeds 4] [--max-tokens 32] [--only 1,2,6]

Each question has one checkable answer (a capital, a sum, a simple fact); the check is a
case-insensitive regular expression over the answer's text. Every setting answers every
question, as the chat asks it (the GGUF's chat template, its default system prompt, one
user message; ``worker.engine.model.fit_chat``), through the engine's own
:class:`~worker.engine.Decoder`; greedy settings once, sampled ones once per seed
(``0 .. seeds-1``). Answers stop at the end-of-turn token or after ``--max-tokens`` tokens
(a right answer to these questions comes in the first sentence).

Prints one row per answer as it goes, then a Markdown table: per setting, the correct
answers out of all (questions × seeds), the share, and the mean answer length in tokens.
The repetition penalty is tried both ways: over the prompt and the answer (HF transformers
and llama.cpp with a short prompt: ``repeat_last_n`` 64 covers the whole of these
prompts) and over the answer only. Results go into docs/LOCAL_MODEL.md by hand.
"""
from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.engine import Decoder, LocalModel, SamplingParams  # noqa: E402
from worker.engine.model import fit_chat, prefill  # noqa: E402

#: (question, regular expression a right answer matches). Fixed: change it and old tables
#: are no longer comparable.
QUESTIONS: list[tuple[str, str]] = [
    ("What is the capital of France?", r"\bparis\b"),
    ("What is the capital of Japan?", r"\btokyo\b"),
    ("What is the capital of Italy?", r"\brome\b"),
    ("What is the capital of Germany?", r"\bberlin\b"),
    ("What is the capital of Spain?", r"\bmadrid\b"),
    ("What is 2 + 2?", r"(?<![\d.])4(?!\d|\.\d)|\bfour\b"),
    ("What is 7 times 8?", r"(?<![\d.])56(?!\d|\.\d)|\bfifty-six\b"),
    ("What is 10 minus 3?", r"(?<![\d.])7(?!\d|\.\d)|\bseven\b"),
    ("How many days are in a week?", r"(?<![\d.])7(?!\d|\.\d)|\bseven\b"),
    ("How many legs does a spider have?", r"(?<![\d.])8(?!\d|\.\d)|\beight\b"),
    ("What color is the sky on a clear day?", r"\bblue\b"),
    ("What is the chemical formula of water?", r"\bH2O\b|H₂O"),
    ("Who wrote Romeo and Juliet?", r"\bshakespeare\b"),
    ("What is the largest planet in our solar system?", r"\bjupiter\b"),
    ("What is the largest ocean on Earth?", r"\bpacific\b"),
    ("At how many degrees Celsius does water freeze?", r"(?<![\d.])0(?!\d|\.\d)|\bzero\b"),
]


@dataclass(frozen=True)
class Setting:
    """One candidate: its name, the sampling, and whether the repetition penalty counts the prompt."""

    name: str
    params: SamplingParams
    penalize_prompt: bool = False

    @property
    def sampled(self) -> bool:
        return self.params.temperature > 0


def settings(max_tokens: int) -> list[Setting]:
    """The candidates, greedy ones first."""
    def p(**kw) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, **kw)

    return [
        Setting("greedy", SamplingParams.greedy(max_tokens)),
        Setting("greedy, penalty 1.1 over prompt+answer", p(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.1), True),
        Setting("greedy, penalty 1.1 over the answer", p(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.1)),
        Setting("T 0.7, top-k 40, top-p 0.9, penalty 1.1 over prompt+answer (old default)",
                p(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1), True),
        Setting("T 0.7, top-k 40, top-p 0.9, penalty 1.1 over the answer",
                p(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1)),
        Setting("T 0.2, top-k 50, top-p 0.9, no penalty (model card)", p(temperature=0.2, top_k=50, top_p=0.9, repetition_penalty=1.0)),
        Setting("T 0.2, top-k 50, top-p 0.9, penalty 1.1 over the answer",
                p(temperature=0.2, top_k=50, top_p=0.9, repetition_penalty=1.1)),
    ]


def answer(model: LocalModel, question: str, params: SamplingParams, penalize_prompt: bool) -> tuple[str, int]:
    """The model's answer to ``question`` as the chat would ask it: (text, tokens generated)."""
    ids, _ = fit_chat(model.tokenizer, [{"role": "user", "content": question}], model.context_length, params.max_tokens)
    decoder = Decoder(model.tokenizer, params, ids, penalize_prompt=penalize_prompt)
    session = uuid.uuid4().hex
    pieces: list[str] = []
    try:
        logits = prefill(model.pipeline, session, ids)
        pos = len(ids)
        while True:
            step = decoder.step(logits)
            pieces.append(step.text)
            if step.done:
                break
            logits = model.pipeline.forward(session, np.asarray([step.token_id], dtype=np.int64), pos)[0]
            pos += 1
        pieces.append(decoder.flush())
    finally:
        model.pipeline.drop_session(session)
    return "".join(pieces), len(decoder.generated_ids)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=4, help="seeds per sampled setting (0..N-1)")
    ap.add_argument("--max-tokens", type=int, default=32, help="longest answer, in tokens")
    ap.add_argument("--only", default="", help="comma-separated setting numbers (1-based) to run")
    ap.add_argument("--model", default=None, help="a GGUF (default: the packaged SmolLM2-135M-Instruct)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model = LocalModel.load(args.model)
    print(f"# {model.display_name}, loaded in {time.perf_counter() - t0:.1f} s; "
          f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    candidates = settings(args.max_tokens)
    if args.only:
        wanted = {int(x) for x in args.only.split(",")}
        candidates = [s for i, s in enumerate(candidates, 1) if i in wanted]
    rows = []
    for s in candidates:
        seeds = list(range(args.seeds)) if s.sampled else [None]
        right = total = tokens = 0
        t = time.perf_counter()
        for seed in seeds:
            params = replace(s.params, seed=seed)
            for question, pattern in QUESTIONS:
                text, n = answer(model, question, params, s.penalize_prompt)
                ok = re.search(pattern, text, re.IGNORECASE) is not None
                right, total, tokens = right + ok, total + 1, tokens + n
                print(f"{'✓' if ok else '✗'} [{s.name} | seed {seed}] {question} → {text.strip()[:160]!r}", flush=True)
        rows.append((s, right, total, tokens / total, time.perf_counter() - t))
        print(f"= {s.name}: {right}/{total} correct, {tokens / total:.1f} tokens per answer, "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    print("\n| setting | correct | share | mean answer tokens |")
    print("| --- | --- | --- | --- |")
    for s, right, total, mean_tokens, _ in rows:
        print(f"| {s.name} | {right}/{total} | {right / total:.0%} | {mean_tokens:.1f} |")
    print(f"\n({len(QUESTIONS)} questions; sampled settings × {args.seeds} seeds; answers up to {args.max_tokens} tokens; "
          f"{time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
