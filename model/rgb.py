"""Any PIL image as RGB, as transformers' processors convert it. Torch-free: the pipeline's decode stage uses it."""

from __future__ import annotations

import PIL.Image


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """`image` as RGB the way transformers' `convert_to_rgb` makes it: transparent pixels composited onto white (not
    dropped), every other mode through Pillow's convert (which clips 16-bit and float samples to 0..255)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
