"""Reference outputs of llama.cpp (exact f32 math) kept in the repository under
``tests/data/reference/`` (see its README.md and SOURCE.md for how they were made)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: The folder with ``<case>.json``, ``<case>_final_logits.npy`` and ``tokenizer_cases.json``.
REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference"


def reference(name: str) -> dict:
    """Reference case ``name`` ("france", "persian_greeting"): prompt text and ids, top-20 final
    logits and 32 greedy ids, as a dict parsed from ``<name>.json``."""
    return json.loads((REFERENCE / f"{name}.json").read_text(encoding="utf-8"))


def reference_logits(name: str) -> np.ndarray:
    """The full final-position logits of case ``name``: float32 array of shape [n_vocab] (49152)."""
    return np.load(REFERENCE / f"{name}_final_logits.npy")
