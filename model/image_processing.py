"""BLIP image preprocessing with PIL: RGB conversion, squash resize, rescale, normalize.

Gives the same numbers as transformers' PIL BLIP image processor (`BlipImageProcessorPil`, the one
InstructBlipProcessor uses without torchvision, and the one matching LAVIS's `blip_image_eval`), including its
dtypes: rescale in float64 then float32, normalize in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch

from .errors import ConfigError, ProcessorError
from .rgb import RgbResize, planes

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Keys that describe the image processor in preprocessor_config.json; the rest are kept and written back.
_KNOWN_KEYS = (
    "do_convert_rgb",
    "do_resize",
    "size",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
)


class BlipImageProcessor:
    """PIL images -> pixel_values float32 [B, 3, H, W]. Defaults are those of transformers' BLIP processor; the
    InstructBLIP / BLIP-2 checkpoints set size 224x224."""

    def __init__(
        self,
        *,
        do_convert_rgb: bool = True,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        resample: int = PIL.Image.Resampling.BICUBIC,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        extra: dict[str, Any] | None = None,
    ) -> None:
        size = dict(size) if size is not None else {"height": 384, "width": 384}
        if set(size) != {"height", "width"} or not all(isinstance(v, int) and v > 0 for v in size.values()):
            raise ConfigError(f"image processor size must be {{'height': int, 'width': int}}, got {size}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ConfigError("image_mean and image_std need 3 values (R, G, B)")
        try:
            self.resample = PIL.Image.Resampling(int(resample))
        except ValueError as err:
            raise ConfigError(f"resample {resample!r} is not a PIL resampling filter") from err
        self.do_convert_rgb = do_convert_rgb
        self.do_resize = do_resize
        self.size = size
        self.do_rescale = do_rescale
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = do_normalize
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.extra = dict(extra or {})

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BlipImageProcessor:
        """Build from a preprocessor_config.json dict (or processor_config.json's "image_processor" entry)."""
        if not isinstance(config, dict):
            raise ConfigError(f"image processor config must be a dict, got {type(config).__name__}")
        known = {k: config[k] for k in _KNOWN_KEYS if k in config}
        return cls(**known, extra={k: v for k, v in config.items() if k not in _KNOWN_KEYS})

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": "BlipImageProcessor",
            **self.extra,
            "do_convert_rgb": self.do_convert_rgb,
            "do_resize": self.do_resize,
            "size": dict(self.size),
            "resample": int(self.resample),
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    def resized(self, image: PIL.Image.Image) -> torch.Tensor:
        """One image RGB-converted and resized: uint8 [3, H, W]. The CPU-heavy half of __call__, which the
        pipeline's prepare stage runs on its threads; `normalize` of the stacked results is the other half (which the
        engine does on its device by `normalize_table`)."""
        if not isinstance(image, PIL.Image.Image):
            raise ProcessorError(f"images must be PIL.Image.Image, got {type(image).__name__}")
        image = self.rgb_resize(image)
        return self.chw(bytearray(planes(image)), *image.size)

    @property
    def rgb_resize(self) -> RgbResize:
        """RGB conversion and resize, the torch-free part of `resized` (PIL image -> PIL image)."""
        return RgbResize(
            self.size["width"], self.size["height"], int(self.resample), self.do_convert_rgb, self.do_resize
        )

    @staticmethod
    def chw(rgb: bytearray, width: int, height: int) -> torch.Tensor:
        """uint8 [3, H, W] over a bytearray of an image's `planes` (not copied)."""
        return torch.frombuffer(rgb, dtype=torch.uint8, count=width * height * 3).view(3, height, width)

    def normalize_table(self) -> torch.Tensor:
        """float32 [3, 256]: `normalize` of every 8-bit value in each channel. normalize works element by element,
        so looking a batch's pixels up in this table gives exactly its result, at a fraction of the cost."""
        return self.normalize(torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(1, 3, 1, 256)).view(3, 256)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] from `resized` -> pixel_values float32 [B, 3, H, W]: rescale, normalize."""
        if self.do_rescale:  # in float64 then float32, as transformers does
            pixels = (pixels.double() * self.rescale_factor).float()
        pixels = pixels.float()
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
            pixels = (pixels - mean) / std
        return pixels.contiguous()

    def __call__(self, images: PIL.Image.Image | Sequence[PIL.Image.Image]) -> torch.Tensor:
        if isinstance(images, PIL.Image.Image):
            images = [images]
        if not images:
            raise ProcessorError("no images given")
        tensors = [self.resized(image) for image in images]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ProcessorError(f"images of different sizes {sorted(shapes)} cannot be batched; enable do_resize")
        return self.normalize(torch.stack(tensors))
