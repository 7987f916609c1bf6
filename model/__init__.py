"""InstructBLIP and BLIP-2 in plain PyTorch, with the API of the transformers classes.

The public names load on first use, so that reading a config (`blipbatch.model.configs`) does not import torch:
the CLI checks a model path before paying for it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from blipbatch._lazy import lazy_exports

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(
        (
            "Blip2Config",
            "Blip2QFormerConfig",
            "Blip2VisionConfig",
            "GenerationConfig",
            "InstructBlipConfig",
            "InstructBlipQFormerConfig",
            "InstructBlipVisionConfig",
            "LlamaConfig",
            "OPTConfig",
            "T5Config",
        ),
        ".configs",
    ),
    **dict.fromkeys(("CheckpointError", "ConfigError", "GenerationError", "ModelError", "ProcessorError"), ".errors"),
    **dict.fromkeys(
        ("Blip2ForConditionalGeneration", "Blip2Model", "InstructBlipForConditionalGeneration", "InstructBlipModel"),
        ".instructblip",
    ),
    **dict.fromkeys(("BatchFeature", "Blip2Processor", "InstructBlipProcessor"), ".processor"),
    "InstructBlipQFormerModel": ".qformer",
    "InstructBlipVisionModel": ".vision",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .configs import (
        Blip2Config,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        GenerationConfig,
        InstructBlipConfig,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
        LlamaConfig,
        OPTConfig,
        T5Config,
    )
    from .errors import CheckpointError, ConfigError, GenerationError, ModelError, ProcessorError
    from .instructblip import (
        Blip2ForConditionalGeneration,
        Blip2Model,
        InstructBlipForConditionalGeneration,
        InstructBlipModel,
    )
    from .processor import BatchFeature, Blip2Processor, InstructBlipProcessor
    from .qformer import InstructBlipQFormerModel
    from .vision import InstructBlipVisionModel


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
