"""Parquet shards of image references -> fetch -> decode -> model -> Parquet parts, on Ray actors.

The public names load on first use, so that importing one stage (`blipbatch.pipeline.fetch`) does not import Ray."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'blipbatch.pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the submodule `run` binds it here under the name of the function it defines; the function is
        # what `blipbatch.pipeline.run` means (as when it was imported eagerly).
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
