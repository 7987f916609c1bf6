"""Checks made before Ray starts and before anything is written, so that a wrong path fails in a second, in one line.

Imports neither torch nor Ray: the CLI runs these checks before it pays for either."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import fsspec
from fsspec.implementations.local import LocalFileSystem

from blipbatch.model.configs import COMPOSITE_CONFIGS

from .job import PipelineError
from .redact import redact


def check_model(path: str) -> None:
    """A local or fsspec checkpoint must have a readable config.json of a model type we load; a Hub id is
    resolved by the workers (from the cache or the Hub)."""
    local = "://" not in path
    if local and not os.path.exists(os.path.expanduser(path)):
        if path.count("/") == 1 and not path.startswith((".", "/", "~")):
            return  # a Hub id such as "Salesforce/instructblip-vicuna-7b"
        raise PipelineError(f"model: checkpoint folder {path} does not exist")
    config = f"{path.rstrip('/')}/config.json"
    try:
        with fsspec.open(os.path.expanduser(config) if local else config, "rb") as f:
            model_type = json.load(f).get("model_type")
    except FileNotFoundError:
        raise PipelineError(
            f"model: {redact(path)} has no config.json; give the checkpoint folder (config.json, weights, tokenizer)"
        ) from None
    except (OSError, ValueError, AttributeError) as e:
        raise PipelineError(f"model: cannot read {redact(config)}: {redact(str(e)) or type(e).__name__}") from None
    if model_type not in COMPOSITE_CONFIGS:
        raise PipelineError(
            f"model: {redact(config)} has model_type {model_type!r}; blipbatch runs "
            f"{' and '.join(sorted(COMPOSITE_CONFIGS))} checkpoints"
        )


def check_output(path: str) -> None:
    """The output must be a folder, or a path where one can be made; on object stores, not an object."""
    fs, root = fsspec.core.url_to_fs(path)
    if not isinstance(fs, LocalFileSystem):
        if fs.isfile(root):
            raise PipelineError(f"output: {redact(path)} is an object, not a folder; give a prefix for the output")
        return
    if os.path.exists(root) and not os.path.isdir(root):
        raise PipelineError(f"output: {path} is a file; give a folder (it is made if missing)")
    parent = root
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise PipelineError(f"output: {parent} is a file, so {path} cannot be made; give a folder")
    try:  # tried, not inferred from permissions: root passes os.access where /proc, /sys or a read-only mount refuse
        _try_writing(root, parent)
    except OSError as e:
        raise PipelineError(
            f"output: {path} cannot be written ({e.strerror or type(e).__name__}); give a writable folder"
        ) from None


def _try_writing(root: str, parent: str) -> None:
    """Make the folder `root` (below its nearest existing folder `parent`) and a file in it, then remove both: the
    check leaves the place as it found it."""
    made = []
    folder = root
    while folder != parent:
        made.append(folder)
        folder = os.path.dirname(folder)
    try:
        for folder in reversed(made):
            os.mkdir(folder)
        with tempfile.TemporaryFile(dir=root):
            pass
    finally:
        for folder in made:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
