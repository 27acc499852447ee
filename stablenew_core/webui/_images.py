"""Deterministic, cheap images for the WebUI simulator.

Owns the drawing only: a two-colour gradient plus one rectangle, all derived from a hash of
(seed, prompt), at any size, in a few milliseconds (Pillow operations, no per-pixel Python).
img2img blends the init image with that drawing; extras resizes.
"""

from __future__ import annotations

import hashlib
import io

from PIL import Image, ImageDraw, ImageOps, PngImagePlugin

_TRANSPOSES = (
    None,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
)


def render(seed: int, prompt: str, width: int, height: int) -> Image.Image:
    """An RGB image that depends only on (seed, prompt, width, height)."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    gradient = Image.linear_gradient("L")
    transpose = _TRANSPOSES[digest[6] % 4]
    if transpose is not None:
        gradient = gradient.transpose(transpose)
    gradient = gradient.resize((width, height), Image.Resampling.BILINEAR)
    image = ImageOps.colorize(gradient, tuple(digest[0:3]), tuple(digest[3:6]))
    box_w = max(1, width * (20 + digest[7] % 40) // 100)
    box_h = max(1, height * (20 + digest[8] % 40) // 100)
    left = (width - box_w) * digest[9] // 255
    top = (height - box_h) * digest[10] // 255
    ImageDraw.Draw(image).rectangle(
        (left, top, left + box_w - 1, top + box_h - 1), fill=tuple(digest[11:14])
    )
    return image


def blend(
    init: Image.Image, seed: int, prompt: str, width: int, height: int, strength: float
) -> Image.Image:
    """img2img: the init image resized to (width, height), moved towards the drawing."""
    base = init.convert("RGB")
    if base.size != (width, height):
        base = base.resize((width, height), Image.Resampling.BILINEAR)
    alpha = min(max(strength, 0.0), 1.0)
    return Image.blend(base, render(seed, prompt, width, height), alpha)


def upscale(init: Image.Image, factor: float) -> Image.Image:
    """Extras: the image resized by ``factor``, sides floored to multiples of 8 (as A1111)."""
    width = max(8, int((init.width * factor) // 8 * 8))
    height = max(8, int((init.height * factor) // 8 * 8))
    return init.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)


def encode_png(image: Image.Image, texts: dict[str, str] | None = None) -> bytes:
    """PNG bytes with text chunks (A1111's API sends its "parameters" infotext this way)."""
    info = None
    if texts:
        info = PngImagePlugin.PngInfo()
        for key, value in texts.items():
            info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=1)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    """Open and fully load image bytes (raises on anything Pillow cannot read)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
