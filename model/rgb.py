"""Any PIL image as RGB, as transformers' processors convert it. Torch-free: the pipeline's decode stage uses it."""

from __future__ import annotations

from dataclasses import dataclass

import PIL.Image

from .errors import ProcessorError


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """`image` as RGB the way transformers' `convert_to_rgb` makes it: transparent pixels composited onto white (not
    dropped), every other mode through Pillow's convert (which clips 16-bit and float samples to 0..255)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class RgbResize:
    """The CPU-heavy half of BlipImageProcessor.resized, torch-free so that decode processes need no torch: RGB
    conversion and the squash to exactly width x height (no crop, as in LAVIS)."""

    width: int
    height: int
    resample: int
    do_convert_rgb: bool = True
    do_resize: bool = True

    @property
    def covering(self) -> int | None:
        """The side a reduced decode (JPEG draft mode) must keep for this resize, or None when there is none."""
        return max(self.width, self.height) if self.do_resize else None

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        plain_rgb = image.mode == "RGB" and image.info.get("transparency") is None
        if self.do_convert_rgb and not plain_rgb:  # to_rgb of plain RGB is a copy of the same pixels: skipped
            image = to_rgb(image)
        elif image.mode != "RGB":
            raise ProcessorError(f"image mode {image.mode!r} needs do_convert_rgb=True (the model takes RGB)")
        if self.do_resize:
            image = image.resize((self.width, self.height), resample=self.resample)  # PIL sizes are (width, height)
        return image


def planes(image: PIL.Image.Image) -> bytes:
    """An RGB image's bytes channel by channel (CHW: all red, then green, then blue), as the model's pixel tensor
    lays them out. Pillow's split copies each band in C on the calling thread: a torch permute here would run on
    torch's intra-op thread pool, whose spinning cost 60 times the copy on a busy machine."""
    return b"".join(band.tobytes() for band in image.split())
