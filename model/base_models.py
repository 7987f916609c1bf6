"""`from_pretrained` / `save_pretrained` in the Hub layout, shared by every model class we export.

One loading path for all of them: resolve the folder (model.hub), read config.json, build the model on
the meta device, give it storage in the target dtype, then copy the checkpoint in shard by shard
(model.loading). The vision tower and the Q-Former also load on their own, from either a standalone
checkpoint (what transformers' `InstructBlipVisionModel.save_pretrained` writes: the sub-config as
config.json, keys without a prefix) or their part of a full InstructBLIP / BLIP-2 checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from .configs import COMPOSITE_CONFIGS, BaseConfig
from .errors import ConfigError
from .hub import checkpoint_dir
from .loading import load_tensors, materialize, save_tensors, weight_files

# model_type of a full checkpoint's config.json -> its config class.
DEFAULT_SHARD_BYTES = 5 * 2**30
M = TypeVar("M", bound="PretrainedModel")
logger = logging.getLogger(__name__)


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise ConfigError(f"{folder}: no config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


class PretrainedModel(nn.Module):
    """A model that loads from and saves to a Hub-layout checkpoint folder.

    Subclasses set `config_class` and `architecture` (the name written into config.json), take the
    config as their only constructor argument, and may name aliased or fallback weights and the
    parameters kept in fp32.
    """

    config_class: ClassVar[type[BaseConfig]]
    config: BaseConfig

    @property
    def architecture(self) -> str:
        """The model's class name in config.json's "architectures" (most subclasses set it as a class attribute)."""
        raise NotImplementedError(f"{type(self).__name__} names no architecture")

    @property
    def tied_weights(self) -> dict[str, str]:
        """Checkpoint keys that name another parameter's tensor: alias -> source."""
        return {}

    @property
    def fallback_weights(self) -> dict[str, str]:
        """Keys a checkpoint may omit -> the key whose values they then take."""
        return {}

    def keep_in_fp32(self, name: str) -> bool:
        """Whether parameter `name` stays fp32 when the model is loaded in half precision."""
        return False

    @classmethod
    def config_from_checkpoint(cls, data: dict[str, Any]) -> tuple[BaseConfig, str]:
        """This model's config from a checkpoint's config.json, and the prefix of its keys there."""
        return cls.config_class.from_dict(data), ""

    def read_extra_files(self, folder: Path) -> None:
        """Read files beside config.json and the weights (e.g. generation_config.json)."""

    def write_extra_files(self, folder: Path) -> None:
        """Write files beside config.json and the weights."""

    @classmethod
    def from_pretrained(
        cls: type[M],
        name_or_path: str | os.PathLike,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        *,
        torch_dtype: torch.dtype | str | None = None,
        device_map: torch.device | str | int | None = None,
    ) -> M:
        """Load from a local folder, an fsspec URL or a Hub id.

        dtype (or transformers' older name torch_dtype): a torch dtype or its name ("float16", "bfloat16", ...), or
        "auto" for the dtype config.json records; default float32. device (or device_map, as transformers: "cpu",
        "cuda", "cuda:N", "auto" = the first GPU if any): where the whole model goes; default cpu.
        """
        folder = checkpoint_dir(name_or_path)
        data = read_config(folder)
        config, prefix = cls.config_from_checkpoint(data)
        dtype = load_dtype(dtype, torch_dtype, data)
        device = load_device(device, device_map)
        with torch.device("meta"):
            model = cls(config)
        materialize(model, dtype, device, model.keep_in_fp32)
        stored_apart = load_tensors(model, weight_files(folder), model.tied_weights, model.fallback_weights, prefix)
        for alias, tensor in stored_apart.items():
            logger.warning(
                "%s: config.json ties %s to %s, but the checkpoint stores both with different values; keeping both "
                "(as transformers does). Set tie_word_embeddings=false in config.json to silence this.",
                folder,
                alias,
                model.tied_weights[alias],
            )
            model.untie(alias, tensor)
        model.tie_weights()
        model.read_extra_files(folder)
        return model.eval()

    @property
    def device(self) -> torch.device:
        """Where the parameters are (transformers' `model.device`)."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model was loaded in (transformers' `model.dtype`): the first floating-point parameter's,
        skipping those kept in fp32 under half precision."""
        floating = [(name, p.dtype) for name, p in self.named_parameters() if p.is_floating_point()]
        return next((dtype for name, dtype in floating if not self.keep_in_fp32(name)), floating[0][1])

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied weight counts once), as transformers counts them."""
        embeddings = set()
        if exclude_embeddings:
            embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(
            p.numel() for p in self.parameters() if (p.requires_grad or not only_trainable) and id(p) not in embeddings
        )

    def tie_weights(self) -> None:
        """Point every alias at its source parameter again (materialising on meta unties them)."""
        params = dict(self.named_parameters(remove_duplicate=False))
        for alias, source in self.tied_weights.items():
            if alias in params and params[alias] is not params[source]:
                module_name, _, attr = alias.rpartition(".")
                setattr(self.get_submodule(module_name), attr, params[source])

    def untie(self, alias: str, values: torch.Tensor) -> None:
        """Give the aliased parameter `alias` a tensor of its own holding `values`."""
        module_name, _, attr = alias.rpartition(".")
        shared = self.get_parameter(alias)
        setattr(self.get_submodule(module_name), attr, nn.Parameter(values.to(shared.dtype).to(shared.device)))
        for name, module in self.named_modules():
            prefix = f"{name}." if name else ""
            owned = vars(module).get("tied_weights")
            if alias.startswith(prefix) and isinstance(owned, dict):
                owned.pop(alias[len(prefix) :], None)

    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int = DEFAULT_SHARD_BYTES) -> None:
        """Write config.json and safetensors weights (sharded above `max_shard_size` bytes); aliases are not stored."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        config["architectures"] = [self.architecture]
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        self.write_extra_files(folder)
        aliases = self.tied_weights
        state = {k: v for k, v in self.state_dict().items() if k not in aliases}
        save_tensors(state, folder, max_shard_size)


def load_dtype(
    dtype: torch.dtype | str | None, torch_dtype: torch.dtype | str | None, config: dict[str, Any]
) -> torch.dtype:
    """The load dtype from `dtype` or its older name `torch_dtype` (a torch dtype, a name, or "auto")."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ConfigError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one of them")
    value = dtype if dtype is not None else torch_dtype
    if value == "auto":
        # What the checkpoint was saved in (transformers 5.x writes "dtype", 4.x "torch_dtype"); float32 if neither.
        value = config.get("dtype") or config.get("torch_dtype") or "float32"
    if value is None or isinstance(value, torch.dtype):
        return value or torch.float32
    found = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ConfigError(
            f"dtype {value!r} is not a floating-point torch dtype; use float32, bfloat16, float16 or 'auto'"
        )
    return found


def load_device(device: torch.device | str | None, device_map: torch.device | str | int | None) -> torch.device:
    """The one device the whole model loads on, from `device` or transformers' `device_map`."""
    if device is not None and device_map is not None:
        raise ConfigError("give device or device_map, not both")
    value = device if device is not None else device_map
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(value, dict):
        raise ConfigError(
            "device_map as a dict (layers split over devices) is not supported: the model loads whole on one device; "
            "use 'cpu', 'cuda', 'cuda:N' or 'auto'"
        )
    try:
        return torch.device(value if value is not None else "cpu")
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device {value!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from err


class PretrainedPart(PretrainedModel):
    """A part of the composite models (vision tower, Q-Former) that also loads and saves on its own."""

    config_key: ClassVar[str]  # its sub-config in a full checkpoint's config.json, e.g. "vision_config"
    checkpoint_prefix: ClassVar[str]  # its keys' prefix in a full checkpoint, e.g. "vision_model."
    standalone: ClassVar[dict[str, type[BaseConfig]]]  # architecture name -> config class of a standalone checkpoint

    @classmethod
    def config_from_checkpoint(cls, data: dict[str, Any]) -> tuple[BaseConfig, str]:
        model_type = data.get("model_type")
        if model_type in COMPOSITE_CONFIGS:
            # Through the full config, which also fixes up cross-part fields (the Q-Former's encoder width).
            full = COMPOSITE_CONFIGS[model_type].from_dict(data)
            return getattr(full, cls.config_key), cls.checkpoint_prefix
        for config_class in cls.standalone.values():
            if config_class.model_type == model_type:
                return config_class.from_dict(data), ""
        readable = sorted([c.model_type for c in cls.standalone.values()] + list(COMPOSITE_CONFIGS))
        raise ConfigError(
            f"config.json has model_type {model_type!r}; {cls.__name__} reads a checkpoint with model_type "
            f"{' / '.join(repr(t) for t in readable)}"
        )

    @property
    def architecture(self) -> str:
        return next(name for name, c in self.standalone.items() if c.model_type == self.config.model_type)
