"""Arrow schemas and row contracts shared by pipeline/ and jobs/."""

from .manifest import MANIFEST_VERSION, JobSettings
from .rows import (
    ERROR_KINDS,
    OUTPUT_COLUMNS,
    STATUS_ERROR,
    STATUS_OK,
    ColumnMapping,
    ProgressRecord,
    SchemaError,
    UnitTiming,
    check_input_schema,
    derive_row_id,
    image_reference,
    is_binary_image,
    output_schema,
    shard_key,
)

__all__ = [
    "MANIFEST_VERSION",
    "JobSettings",
    "ERROR_KINDS",
    "OUTPUT_COLUMNS",
    "STATUS_ERROR",
    "STATUS_OK",
    "ColumnMapping",
    "ProgressRecord",
    "SchemaError",
    "UnitTiming",
    "check_input_schema",
    "derive_row_id",
    "image_reference",
    "is_binary_image",
    "output_schema",
    "shard_key",
]
