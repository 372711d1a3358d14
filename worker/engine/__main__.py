"""``python -m worker.engine``: run the local engine from the command line.

Examples::

    python -m worker.engine --chat "What is the capital of France?" --greedy
    python -m worker.engine --chat "سلام!" --temperature 0.7 --seed 1 --max-tokens 64
    python -m worker.engine --chat "Hi" --greedy --blocks-per-stage 10 --json

``--json`` prints one object: ``{"prompt_ids": [...], "generated_ids": [...],
"text": "...", "finish_reason": "..."}`` — the way to check this engine
against another implementation.
"""
from __future__ import annotations

import argparse
import json
import sys

from .gguf_file import ModelLoadError
from .model import LocalModel
from .sampling import SamplingParams


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker.engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("prompt", help="prompt text (raw, unless --chat)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template")
    ap.add_argument("--model", default=None, help="GGUF path (default: $ARGUS_MODEL_PATH or the packaged SmolLM2)")
    ap.add_argument("--greedy", action="store_true", help="argmax decoding (overrides sampling options)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--repetition-penalty", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--blocks-per-stage", type=int, default=None, help="chain stages of K blocks in this process")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    a = ap.parse_args(argv)
    try:
        params = (
            SamplingParams.greedy(a.max_tokens)
            if a.greedy
            else SamplingParams(a.temperature, a.top_k, a.top_p, a.repetition_penalty, a.max_tokens, a.seed)
        )
        model = LocalModel.load(a.model, a.blocks_per_stage)
    except (ValueError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.chat:
        gen = model.chat([{"role": "user", "content": a.prompt}], params)
    else:
        gen = model.generate(model.tokenizer.encode(a.prompt), params)
    pieces = []
    for piece in gen:
        pieces.append(piece)
        if not a.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if a.json:
        print(json.dumps({
            "prompt_ids": gen.prompt_ids, "generated_ids": gen.generated_ids,
            "text": "".join(pieces), "finish_reason": gen.finish_reason,
        }, ensure_ascii=False))
    else:
        print()
        if gen.notice:
            print(gen.notice, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
