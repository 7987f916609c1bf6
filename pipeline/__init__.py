"""Parquet shards of image references -> fetch -> decode -> model -> Parquet parts, on Ray actors."""

from .coordinator import RunSummary
from .run import PipelineError, run

__all__ = ["PipelineError", "RunSummary", "run"]
