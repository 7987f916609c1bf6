"""Read and write checkpoint tensors in the Hub layout, one shard at a time.

Reading never holds more than the model plus one shard: the model is built on the meta device,
materialised empty in the target dtype, and each tensor is copied into place as its shard is read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

# Derived tensors some exporters store, and T5's unused cross-attention bias in old checkpoints.
IGNORED_KEYS = re.compile(r"(rotary_emb\.inv_freq|\.position_ids|EncDecAttention\.relative_attention_bias\.weight)$")


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors preferred; a shard named in an index must exist."""
    for single, index in ((SAFE_SINGLE, SAFE_INDEX), (BIN_SINGLE, BIN_INDEX)):
        if (folder / index).exists():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{folder / index}: not a valid shard index ({e})") from e
            shards = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [p.name for p in shards if not p.exists()]
            if missing:
                raise CheckpointError(
                    f"{folder}: shard(s) listed in {index} are missing: {', '.join(missing)}; "
                    "the download is incomplete"
                )
            return shards
        if (folder / single).exists():
            return [folder / single]
    raise CheckpointError(
        f"{folder}: no weights found (looked for {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE}, {BIN_INDEX})"
    )


def iter_tensors(files: list[Path], prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) for every tensor whose key starts with `prefix` (stripped), shard after shard.

    Other tensors are never read (safetensors reads by key; .bin files are memory-mapped)."""
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key.startswith(prefix):
                        yield key[len(prefix) :], f.get_tensor(key)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # unpickling failures come in many types; all mean "unreadable file"
                raise CheckpointError(f"{path}: cannot read as a PyTorch weights file ({e})") from e
            for key, tensor in state.items():
                if key.startswith(prefix):
                    yield key[len(prefix) :], tensor
            del state


def materialize(
    model: nn.Module, dtype: torch.dtype, device: torch.device, keep_in_fp32: Callable[[str], bool]
) -> None:
    """Give a meta-device model real (uninitialised) storage: `dtype`, or fp32 where `keep_in_fp32(name)`."""
    for name, param in model.named_parameters():
        target = torch.float32 if keep_in_fp32(name) else dtype
        if param.dtype != target:
            param.data = param.data.to(target)
    model.to_empty(device=device)


def load_tensors(
    model: nn.Module,
    files: list[Path],
    aliases: dict[str, str],
    fallbacks: dict[str, str] | None = None,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Copy every checkpoint tensor into `model`, casting to each parameter's dtype.

    With `prefix`, only the checkpoint's keys under it are read, into a model whose names lack it (the
    vision tower of a full checkpoint). `aliases` maps a checkpoint key that names a shared tensor (a tied
    head, T5's embed_tokens) to the key it shares storage with; `fallbacks` maps a key the checkpoint may
    omit to the key whose values it then takes. Missing, unexpected or mis-shaped keys raise one error listing them all.

    Returns the aliases the checkpoint stores with values of their own (a config that says "tied" over a file
    that is not): transformers keeps both tensors then, and so must the caller.
    """
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    expected = set(model.state_dict()) - set(aliases)
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    stored_aliases: dict[str, torch.Tensor] = {}
    for key, tensor in iter_tensors(files, prefix):
        target_key = aliases.get(key, key)
        if IGNORED_KEYS.search(key):
            continue
        if target_key not in params:
            unexpected.append(key)
            continue
        target = params[target_key]
        if tuple(tensor.shape) != tuple(target.shape):
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(target.shape)}")
            continue
        if key != target_key:
            stored_aliases[key] = tensor
            if target_key in loaded:
                continue  # an alias stored next to its source: the source wins here
        with torch.no_grad():
            target.copy_(tensor)
        loaded.add(target_key)
    for key, source in (fallbacks or {}).items():
        if key not in loaded and source in loaded:
            with torch.no_grad():
                params[key].copy_(params[source])
            loaded.add(key)
    missing = sorted(prefix + key for key in expected - loaded)
    unexpected = [prefix + key for key in unexpected]
    mismatched = [prefix + text for text in mismatched]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    if problems:
        part = f"the {prefix.rstrip('.')!r} part of the " if prefix else ""
        raise CheckpointError(
            f"{files[0].parent}: {part}checkpoint does not fit the model built from its config.json: "
            + " | ".join(problems)
        )
    return {
        key: tensor
        for key, tensor in stored_aliases.items()
        if not torch.equal(tensor.to(params[aliases[key]].dtype), params[aliases[key]].detach().cpu())
    }


def save_tensors(
    state: dict[str, torch.Tensor],
    folder: Path,
    max_shard_bytes: int,
) -> None:
    """Write `state` as model.safetensors, or as shards with an index when larger than `max_shard_bytes`."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.detach().contiguous().cpu()
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / SAFE_SINGLE), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2))
