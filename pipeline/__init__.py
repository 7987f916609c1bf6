"""Parquet shards of image references -> fetch -> decode -> model -> Parquet parts, on Ray actors."""

from .coordinator import RunSummary
from .job import InputConfig, Job, ModelConfig, OutputConfig, PipelineError, RunConfig
from .run import run

__all__ = ["InputConfig", "Job", "ModelConfig", "OutputConfig", "PipelineError", "RunConfig", "RunSummary", "run"]
