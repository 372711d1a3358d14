"""Choosing the next token from logits.

Order as in llama.cpp's default sampler chain and HF transformers' logits
processors: repetition penalty (Keskar et al. 2019, CTRL, arXiv:1909.05858:
divide positive logits, multiply negative ones), then temperature, top-k,
top-p (nucleus; Holtzman et al. 2019, arXiv:1904.09751), then a draw.
Temperature 0 is greedy (argmax).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Optional

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """Generation settings. ``max_tokens`` counts generated tokens.

    Raises ValueError for out-of-range values.
    """

    temperature: float = 0.7
    top_k: int = 40  # 0 = off
    top_p: float = 0.9  # 1.0 = off
    repetition_penalty: float = 1.1  # 1.0 = off
    max_tokens: int = 256
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @classmethod
    def greedy(cls, max_tokens: int = 256) -> "SamplingParams":
        return cls(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_tokens=max_tokens)

    def with_max_tokens(self, n: int) -> "SamplingParams":
        return replace(self, max_tokens=n)

    def to_wire(self) -> dict:
        """The ``sampling`` record of an ``inference_request`` (``worker.protocol.SAMPLING_FIELDS``
        less ``ignore_eos``): temperature, top_p, top_k, repetition_penalty, seed. The token
        limit travels apart (``max_length``)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty, "seed": self.seed}

    @classmethod
    def from_wire(cls, sampling: Optional[dict], max_tokens: int) -> "SamplingParams":
        """The inverse of :meth:`to_wire`: no record at all means greedy; a field that is absent
        or null takes the default (greedy's when the temperature is 0). ``max_tokens`` >= 1 is
        enforced. Raises ValueError for out-of-range values."""
        s = sampling or {}
        temperature = s.get("temperature")
        if temperature is None:
            temperature = 0.0 if sampling is None else cls.temperature
        base = cls.greedy() if float(temperature) == 0.0 else cls()

        def pick(name: str, kind: type):
            value = s.get(name)
            return getattr(base, name) if value is None else kind(value)

        return cls(temperature=float(temperature), top_k=pick("top_k", int), top_p=pick("top_p", float),
                   repetition_penalty=pick("repetition_penalty", float), max_tokens=max(1, max_tokens),
                   seed=s.get("seed"))


class Sampler:
    """Stateful sampler for one generation (holds the RNG seeded by ``params.seed``)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, previous: Iterable[int] = ()) -> int:
        """logits [vocab] f32, previous token ids -> next token id."""
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if p.repetition_penalty != 1.0:
            seen = np.fromiter(set(previous), dtype=np.int64)
            if seen.size:
                logits = logits.copy()
                v = logits[seen]
                logits[seen] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if p.temperature == 0.0:
            return int(np.argmax(logits))
        logits = logits.astype(np.float64) / p.temperature
        if p.top_k and p.top_k < logits.size:
            idx = np.argpartition(logits, -p.top_k)[-p.top_k :]
        else:
            idx = np.arange(logits.size)
        idx = idx[np.argsort(-logits[idx], kind="stable")]  # candidates, best first
        probs = np.exp(logits[idx] - logits[idx[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            idx, probs = idx[:keep], probs[:keep] / probs[:keep].sum()
        return int(idx[self.rng.choice(idx.size, p=probs)])
