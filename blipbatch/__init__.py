"""blipbatch: InstructBLIP / BLIP-2 over millions of images, with the transformers API, on Ray.

The public names load on first use, so `import blipbatch.model` does not import Ray and `import blipbatch`
imports nothing heavy:

    from blipbatch import InstructBlipForConditionalGeneration, InstructBlipProcessor, load_spec
    from blipbatch import run          # the pipeline: Parquet shards in, Parquet out
    run(load_spec("job.toml"))         # the job a spec file describes (flags: load_spec(path, overrides))
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from .errors import BlipbatchError

try:
    __version__ = version("blipbatch")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(
        (
            "Blip2Config",
            "Blip2ForConditionalGeneration",
            "Blip2Model",
            "Blip2Processor",
            "Blip2QFormerConfig",
            "Blip2VisionConfig",
            "GenerationConfig",
            "InstructBlipConfig",
            "InstructBlipForConditionalGeneration",
            "InstructBlipModel",
            "InstructBlipProcessor",
            "InstructBlipQFormerConfig",
            "InstructBlipQFormerModel",
            "InstructBlipVisionConfig",
            "InstructBlipVisionModel",
            "ModelError",
        ),
        "blipbatch.model",
    ),
    "run": "blipbatch.pipeline",
    "Job": "blipbatch.pipeline",
    "RunSummary": "blipbatch.pipeline",
    "PipelineError": "blipbatch.pipeline",
    "SpecError": "blipbatch.jobs.spec",
    "load_spec": "blipbatch.jobs.spec",
    "read_output": "blipbatch.pipeline.sink",
}

__all__ = ["BlipbatchError", "__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .jobs.spec import SpecError, load_spec
    from .model import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Model,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        GenerationConfig,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipModel,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipQFormerModel,
        InstructBlipVisionConfig,
        InstructBlipVisionModel,
        ModelError,
    )
    from .pipeline import Job, PipelineError, RunSummary, run
    from .pipeline.sink import read_output


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
