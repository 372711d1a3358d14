"""BlockRange: the one small value that names a piece of a model.

Modelled on exo's ``Shard`` (exo/inference/shard.py), with a half-open range
(``start`` inclusive, ``end`` exclusive) so that consecutive ranges chain as
``a.end == b.start`` without off-by-one arithmetic. Everything that places,
sends, loads or runs part of a model passes this value.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockRange:
    """Transformer blocks ``[start, end)`` of a model with ``total`` blocks.

    The first range (``start == 0``) also owns the token embedding; the last
    (``end == total``) also owns the final norm and the output head.

    Raises ValueError when the range is empty or outside ``[0, total]``.
    """

    model_id: str
    start: int
    end: int
    total: int

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end <= self.total):
            raise ValueError(
                f"block range [{self.start}, {self.end}) is empty or outside the model's {self.total} blocks"
            )

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.total

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        return iter(range(self.start, self.end))

    @classmethod
    def whole(cls, model_id: str, total: int) -> "BlockRange":
        return cls(model_id, 0, total, total)

    @classmethod
    def split_even(cls, model_id: str, total: int, per_range: int) -> list["BlockRange"]:
        """Chain of ranges of ``per_range`` blocks (the last may be shorter)."""
        if per_range < 1:
            raise ValueError(f"per_range must be >= 1, got {per_range}")
        return [cls(model_id, s, min(s + per_range, total), total) for s in range(0, total, per_range)]

    def __str__(self) -> str:
        return f"{self.model_id}[{self.start}:{self.end}]/{self.total}"
