"""Parquet shards of image references -> fetch -> decode -> model -> Parquet parts, on Ray actors.

The public names load on first use, so that importing one stage (`blipbatch.pipeline.fetch`) does not import Ray."""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from blipbatch._lazy import lazy_exports

# public name -> the module that defines it
_EXPORTS = {
    "RunSummary": ".coordinator",
    **dict.fromkeys(("InputConfig", "Job", "ModelConfig", "OutputConfig", "PipelineError", "RunConfig"), ".job"),
    "run": ".run",
}

__all__ = ["InputConfig", "Job", "ModelConfig", "OutputConfig", "PipelineError", "RunConfig", "RunSummary", "run"]

if TYPE_CHECKING:
    from .coordinator import RunSummary
    from .job import InputConfig, Job, ModelConfig, OutputConfig, PipelineError, RunConfig
    from .run import run


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the submodule `run` binds it here under the name of the function it defines; the function is
        # what `blipbatch.pipeline.run` means (as when it was imported eagerly).
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
