"""The NumPy Llama engine: GGUF loading, block-range stages, sampling, generation.

Imports nothing from the rest of ``worker`` or from ``argus``. Modules, one job each:

    gguf_file    open a GGUF model file: its config, metadata and dequantized tensors
    shardfile    a shard file: one block range's tensors as one self-contained byte bundle
    block_range  BlockRange, the value naming a range of transformer blocks
    weights      the float32 weights of one block / one block range, loaded from either file
    ops          the Llama math as pure array functions (rms_norm, rope, attention, swiglu, block)
    kv_cache     the per-session KV cache interface a stage uses, and its in-memory default
    paged_kv     paged per-session KV caches saved to disk, and their store
    stage        Stage (one block range's weights and sessions' caches) and Pipeline (stages chained)
    tokenizer    the GGUF's BPE tokenizer, chat template and streaming detokenizer
    sampling     SamplingParams (with its wire form) and Sampler
    decoding     Decoder: one answer's logits -> token, text piece, finish reason
    model        LocalModel: model, tokenizer and pipeline ready to chat; prefill; fit_chat
    __main__     ``python -m worker.engine``: the local engine from the command line

Public API::

    from worker.engine import LocalModel, SamplingParams, ModelLoadError, BlockRange, Stage, Pipeline
"""
from .gguf_file import LlamaConfig, ModelFile, ModelLoadError, default_model_path
from .model import Generation, LocalModel
from .sampling import Sampler, SamplingParams
from .block_range import BlockRange
from .decoding import DecodeStep, Decoder
from .stage import Pipeline, Stage

__all__ = [
    "BlockRange", "DecodeStep", "Decoder", "Generation", "LlamaConfig", "LocalModel", "ModelFile", "ModelLoadError",
    "Pipeline", "Sampler", "SamplingParams", "Stage", "default_model_path",
]
