"""Find a checkpoint folder on local disk, given a local path, an fsspec URL or a Hugging Face Hub id."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import CheckpointError

# What from_pretrained reads; anything else in a remote folder (old .bin uploads, READMEs) is not copied.
METADATA_SUFFIXES = (".json", ".txt", ".model")
SAFETENSORS_SUFFIX = ".safetensors"
BIN_SUFFIX = ".bin"


def cache_root() -> Path:
    """Where remote checkpoints are copied: $BLIPBATCH_CACHE, else ~/.cache/blipbatch."""
    return Path(os.environ.get("BLIPBATCH_CACHE", Path.home() / ".cache" / "blipbatch"))


def checkpoint_dir(name_or_path: str | os.PathLike) -> Path:
    """Return a local folder holding the checkpoint `name_or_path`.

    - a local folder is used as it is;
    - an fsspec URL (s3://bucket/prefix, gs://..., file://...) is copied into the cache once;
    - anything else that looks like `org/name` is fetched from the Hub with huggingface_hub.
    """
    text = os.fspath(name_or_path)
    if "://" in text:
        return _copy_from_fsspec(text)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{text} is a file; pass the folder that holds config.json and the weights")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _download_from_hub(text)
    raise CheckpointError(f"checkpoint folder {text} does not exist")


def _wanted(names: list[str]) -> list[str]:
    """Metadata plus one weight format: safetensors when present, else the .bin files."""
    metadata = [n for n in names if n.endswith(METADATA_SUFFIXES)]
    safetensors = [n for n in names if n.endswith(SAFETENSORS_SUFFIX)]
    weights = safetensors or [n for n in names if n.endswith(BIN_SUFFIX)]
    return metadata + weights


def _copy_from_fsspec(url: str) -> Path:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except Exception as e:  # each fsspec backend raises its own types (botocore's are not OSError)
        raise CheckpointError(f"cannot list checkpoint folder {url}: {type(e).__name__}: {e}") from e
    if not found:
        raise CheckpointError(f"checkpoint folder {url} is empty or does not exist")
    sizes = {path[len(root) + 1 :]: info.get("size") for path, info in found.items()}
    local = cache_root() / "remote" / hashlib.sha256(url.encode()).hexdigest()[:16]
    for name in _wanted(sorted(sizes)):
        target = local / name
        if target.exists() and target.stat().st_size == sizes[name]:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        try:
            fs.get_file(f"{root}/{name}", str(partial))
        except Exception as e:  # as above: backend-specific error types
            raise CheckpointError(f"cannot copy {url}/{name}: {type(e).__name__}: {e}") from e
        partial.replace(target)
    return local


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.model", "*.safetensors"]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns + ["*.bin"]))
    except Exception as e:  # huggingface_hub raises many unrelated types for offline, missing and auth errors
        raise CheckpointError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            f"Without Hub access, download the checkpoint elsewhere and pass its local folder "
            f"(or an s3:// / gs:// URL), e.g. from_pretrained('/data/{repo_id.split('/')[-1]}')"
        ) from e
    return folder
