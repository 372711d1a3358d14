"""One answer's decoding step: logits in -> token, text piece, finish reason out.

Both generation loops drive it — the local one (:class:`worker.engine.model.Generation`,
a thread) and the network's (the admin daemon's loop over pipelined stages) — so sampling,
stop tokens, the token limit and UTF-8-safe text pieces behave the same everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer

#: Whether the repetition penalty counts the prompt's tokens by default (measured: it should not,
#: see docs/LOCAL_MODEL.md).
PENALIZE_PROMPT = False
#: Why an answer ended: a stop token, the token limit, or the caller cancelled it.
FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(frozen=True)
class DecodeStep:
    """What one step produced.

    ``token_id``: the sampled token, or None when the step sampled a stop token (which is
    not part of the answer). ``text``: the text the token completes (may be "" while a
    multi-byte character is incomplete). ``finish_reason``: None to go on, "stop" or "length".
    """

    token_id: Optional[int]
    text: str
    finish_reason: Optional[str]

    @property
    def done(self) -> bool:
        """True when the answer ended with this step (no further forward pass is needed)."""
        return self.finish_reason is not None


class Decoder:
    """Turns each position's logits into the next token and its text for one answer.

    ``prompt_ids``: the prompt; ``params``: sampling settings, ``params.max_tokens`` generated
    tokens at most; ``ignore_eos``: keep going past stop tokens (benchmarks);
    ``penalize_prompt``: whether the repetition penalty also counts the prompt's tokens
    (HF transformers' way: the whole sequence) instead of the answer's only (the default:
    with the prompt counted, an answer is pushed away from the words of the question and the
    chat template — "capital", "France" — which lost answers in ``bench/local_defaults.py``,
    see docs/LOCAL_MODEL.md).
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, prompt_ids: Sequence[int] = (),
                 *, ignore_eos: bool = False, penalize_prompt: bool = PENALIZE_PROMPT):
        self.params = params
        self.sampler = Sampler(params)
        self.stop_ids = frozenset() if ignore_eos else tokenizer.stop_ids
        self.text = tokenizer.stream_decoder()
        self.prompt_ids: list[int] = list(prompt_ids)
        #: The tokens the repetition penalty looks at: the answer's (and the prompt's when penalized).
        self.history: list[int] = list(prompt_ids) if penalize_prompt else []
        self.generated_ids: list[int] = []
        self.finish_reason: Optional[str] = None

    def step(self, logits: np.ndarray) -> DecodeStep:
        """logits [n_vocab] float32 of the last position -> the next :class:`DecodeStep`.

        Raises RuntimeError when called after the answer finished.
        """
        if self.finish_reason is not None:
            raise RuntimeError(f"the answer already finished ({self.finish_reason})")
        token = self.sampler(logits, self.history)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return DecodeStep(None, "", "stop")
        self.generated_ids.append(token)
        self.history.append(token)
        piece = self.text.push(token)
        if len(self.generated_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
        return DecodeStep(token, piece, self.finish_reason)

    def cancel(self) -> None:
        """Mark the answer as cancelled by its caller (a Stop, a closed connection)."""
        self.finish_reason = self.finish_reason or "cancelled"

    def flush(self) -> str:
        """End of the answer: the text still held back, which is always "" — the bytes of a
        character the answer left incomplete (cut by the token limit, a stop token or a cancel
        mid-character) are dropped, so an answer never ends in U+FFFD (invalid bytes inside an
        answer are dropped as they come, see :class:`~worker.engine.tokenizer.StreamDecoder`).
        Kept so both generation loops end the same way should the rule change."""
        return self.text.flush()
