"""LocalModel: a GGUF model, its tokenizer and a chain of stages, ready to chat.

This is what the chat server's local provider and ``python -m worker.engine``
use. One instance is shared by all users: every generation gets its own
session (its own KV cache in every stage), so concurrent calls are safe.
"""
from __future__ import annotations

import threading
import uuid
from typing import Iterator, Optional, Sequence

import numpy as np

from .gguf_file import ModelFile, ModelLoadError, default_model_path
from .decoding import Decoder
from .sampling import SamplingParams
from .stage import Pipeline
from .tokenizer import Tokenizer, TokenizerError


#: Prompt tokens per prefill forward pass. Attention scores of a chunk take
#: n_head * chunk * t * 4 bytes (SmolLM2: 9 * 256 * 8192 * 4 = 75 MB at a full
#: 8192-token context), instead of growing with the square of the prompt.
PREFILL_CHUNK = 256


def prefill(
    pipeline: Pipeline, session: str, ids: Sequence[int], chunk: int = PREFILL_CHUNK, start: int = 0
) -> np.ndarray:
    """Run ``ids[start:]`` through ``pipeline`` for ``session`` from position ``start`` in chunks of ``chunk`` tokens.

    ``start`` > 0 resumes a session whose cache already holds ``ids[:start]``
    (see ``Pipeline.cached_prefix``); it is capped at ``len(ids) - 1`` so that
    the last position is computed. Returns the last position's logits [vocab]
    f32 (identical to one big pass up to f32 summation order).
    """
    arr = np.asarray(ids, dtype=np.int64)
    logits = None
    for pos in range(max(0, min(start, arr.size - 1)), arr.size, chunk):
        logits = pipeline.forward(session, arr[pos : pos + chunk], pos)[0]
    return logits


class Generation:
    """One generation, iterated in the caller's thread.

    Iterating yields text pieces (whole UTF-8 characters). Afterwards:
    ``finish_reason`` is "stop" (end-of-turn token), "length" (max tokens or
    the context window), "cancelled" (``cancel`` was set) or "context" (the
    prompt alone does not fit; nothing was generated); ``notice`` is a
    sentence for the user or None; ``prompt_ids``/``generated_ids`` are the
    token ids; ``dropped_messages`` counts history messages trimmed to fit.
    """

    def __init__(
        self,
        model: "LocalModel",
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cancel: Optional[threading.Event] = None,
        notice: Optional[str] = None,
        dropped_messages: int = 0,
    ):
        self.model = model
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.cancel = cancel or threading.Event()
        self.notice = notice
        self.dropped_messages = dropped_messages
        self.generated_ids: list[int] = []
        self.finish_reason: Optional[str] = None
        self._started = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.generated_ids)

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a Generation can be iterated once")
        self._started = True
        return self._run()

    def _run(self) -> Iterator[str]:
        m = self.model
        ctx = m.context_length
        if not self.prompt_ids or len(self.prompt_ids) >= ctx:
            self.finish_reason = "context"
            self.notice = self.notice or (
                f"Your message is {len(self.prompt_ids)} tokens long and this model's context window holds {ctx}; "
                "please send a shorter message."
            )
            return
        max_new = min(self.params.max_tokens, ctx - len(self.prompt_ids))
        decoder = Decoder(m.tokenizer, self.params.with_max_tokens(max_new), self.prompt_ids)
        self.generated_ids = decoder.generated_ids
        session = uuid.uuid4().hex
        try:
            if self.cancel.is_set():
                self.finish_reason = "cancelled"
                return
            logits = prefill(m.pipeline, session, self.prompt_ids)
            pos = len(self.prompt_ids)
            while True:
                if self.cancel.is_set():
                    decoder.cancel()
                    break
                step = decoder.step(logits)
                if step.text:
                    yield step.text
                if step.done:
                    if step.finish_reason == "length" and max_new < self.params.max_tokens:
                        self.notice = "The answer was cut off: it reached the end of the model's context window."
                    break
                logits = m.pipeline.forward(session, np.asarray([step.token_id], dtype=np.int64), pos)[0]
                pos += 1
            self.finish_reason = decoder.finish_reason
            tail = decoder.flush()
            if tail:
                yield tail
        finally:
            m.pipeline.drop_session(session)


def fit_chat(tokenizer: Tokenizer, messages: Sequence[dict], context_tokens: int, max_tokens: int) -> tuple[list[int], int]:
    """The token ids of ``messages`` (``[{"role", "content"}]``, oldest first) under the chat
    template with the generation prompt, and how many old messages were dropped to fit.

    The prompt may take ``context_tokens - min(max_tokens, context_tokens // 4)`` tokens;
    when it does not, the oldest messages after a leading system message are dropped, the
    fewest that fit (binary search: O(log n) encodings, not one per message), the newest
    message always kept. The result may still be longer than the window (one huge
    message); the caller refuses it.
    """
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    system = [m for m in msgs[:1] if m["role"] == "system"]
    rest = msgs[len(system):]
    budget = context_tokens - min(max_tokens, context_tokens // 4)

    def encode(drop: int) -> list[int]:
        return tokenizer.encode_chat(system + rest[drop:])

    ids, dropped = encode(0), 0
    if len(ids) > budget and len(rest) > 1:
        lo, hi = 1, len(rest) - 1  # the answer lies in [lo, hi]; hi (newest only) is the last resort
        while lo < hi:
            mid = (lo + hi) // 2
            if len(encode(mid)) <= budget:
                hi = mid
            else:
                lo = mid + 1
        ids, dropped = encode(lo), lo
    return ids, dropped


class LocalModel:
    """A loaded model. Build with :meth:`load`.

    Attributes: ``model_id`` (stable id from the file's tensor table),
    ``display_name``, ``context_length`` (tokens), ``tokenizer``, ``pipeline``.
    """

    def __init__(self, mf: ModelFile, pipeline: Pipeline, tokenizer: Tokenizer):
        self.file = mf
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.model_id = mf.model_id
        self.context_length = mf.config.context_length
        name = mf.field("general.name") or mf.field("general.basename") or "local model"
        self.display_name = f"{name} (local)"

    @classmethod
    def load(cls, path: Optional[str] = None, blocks_per_stage: Optional[int] = None) -> "LocalModel":
        """Open ``path`` (default: :func:`default_model_path`) and dequantize its weights
        into ``ceil(n_block / blocks_per_stage)`` chained stages (default one).

        Raises ModelLoadError with a user-facing sentence on any failure.
        """
        mf = ModelFile(path or default_model_path())
        try:
            tokenizer = Tokenizer.from_gguf(mf.reader)
        except TokenizerError as e:
            raise ModelLoadError(f"{mf.path}: {e}") from None
        try:
            pipeline = Pipeline.load(mf, blocks_per_stage)
        except (ValueError, MemoryError) as e:
            raise ModelLoadError(f"Could not load {mf.path}: {e}") from None
        return cls(mf, pipeline, tokenizer)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, cancel: Optional[threading.Event] = None) -> Generation:
        """A generation continuing ``prompt_ids`` (no template applied)."""
        return Generation(self, prompt_ids, params, cancel)

    def chat(self, messages: Sequence[dict], params: SamplingParams, cancel: Optional[threading.Event] = None) -> Generation:
        """A generation answering ``messages`` ([{"role", "content"}], oldest first), chat template applied.

        When the conversation does not fit the context window with room for
        the answer, the oldest messages after any system message are dropped
        first (the newest message always stays); ``dropped_messages`` and
        ``notice`` say so. The fewest drops that fit are found by binary
        search: O(log n) encodings of the conversation, not one per message.
        """
        ids, dropped = fit_chat(self.tokenizer, messages, self.context_length, params.max_tokens)
        notice = None
        if dropped:
            notice = f"The conversation is longer than the model can read at once; the oldest {dropped} message(s) were left out."
        return Generation(self, ids, params, cancel, notice=notice, dropped_messages=dropped)
