"""The root of every error blipbatch raises on purpose.

Each part keeps its own errors beside its code (`blipbatch.model.errors`, `blipbatch.pipeline.errors`, ...), all
under `BlipbatchError`, so a caller catches one type to tell our refusals from bugs.
"""


class BlipbatchError(Exception):
    """A refusal or failure blipbatch explains in its message: bad input, settings, checkpoint, storage."""
