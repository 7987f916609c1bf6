"""Typed errors raised by `model/`: each names what is wrong and how to fix it."""

from blipbatch.errors import BlipbatchError


class ModelError(BlipbatchError):
    """Base class of every error raised by blipbatch's model package."""


class ConfigError(ModelError, ValueError):
    """A config.json (or a config dict) that we cannot build a model from."""


class CheckpointError(ModelError):
    """A checkpoint that cannot be located or read, or whose tensors do not fit the model."""


class ProcessorError(ModelError, ValueError):
    """Inputs that the processor or the model refuses (bad image, placeholder mismatch, ...)."""


class GenerationError(ModelError, ValueError):
    """Generation settings that contradict each other or the model."""
