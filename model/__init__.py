"""InstructBLIP and BLIP-2 in plain PyTorch, with the API of the transformers classes."""

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

__all__ = [
    "BatchFeature",
    "Blip2Config",
    "Blip2ForConditionalGeneration",
    "Blip2Model",
    "Blip2Processor",
    "Blip2QFormerConfig",
    "Blip2VisionConfig",
    "CheckpointError",
    "ConfigError",
    "GenerationConfig",
    "GenerationError",
    "InstructBlipConfig",
    "InstructBlipForConditionalGeneration",
    "InstructBlipModel",
    "InstructBlipProcessor",
    "InstructBlipQFormerConfig",
    "InstructBlipQFormerModel",
    "InstructBlipVisionConfig",
    "InstructBlipVisionModel",
    "LlamaConfig",
    "ModelError",
    "OPTConfig",
    "ProcessorError",
    "T5Config",
]
