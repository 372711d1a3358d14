"""The NumPy Llama engine: GGUF loading, block-range stages, sampling, generation.

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
