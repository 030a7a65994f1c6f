"""Images in and out: robust loading (any file a user may point `apex score` at becomes RGB or a
clear reason) and the grids that eval folders and the mini world's snapshots are written as.

Handles zero-byte, truncated, corrupt and non-image files (reported, never raised past the
caller), decompression bombs (pixel count checked from the header before decoding), EXIF
rotation, and every PIL mode: CMYK / YCbCr / LAB / palette / 1-bit convert to RGB, alpha is
composited over white, 16-bit and 32-bit integer greys are scaled to 8 bits (PIL's own
convert would clip them to white), float images are read as [0,1] when they fit.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})
DEFAULT_MAX_PIXELS = 100_000_000  # 10k x 10k; larger images are refused before decoding
# Decoded pixels one `apex score` batch may hold (--max-batch-pixels): an image the per-image
# guard lets through is scored, alone if need be, but never 32 of them at once (two 10 kB PNGs
# declaring 10k x 10k each once took 7.3 GB). Checked from the headers before decoding.
DEFAULT_BATCH_PIXELS = DEFAULT_MAX_PIXELS


class ImageLoadError(Exception):
    """The file is not a usable image; str(exc) is the reason shown to the user."""


def _to_8bit_grey(im: Image.Image) -> Image.Image:
    arr = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
    elif im.mode.startswith("I;16") or (arr.size and arr.max() > 255):
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    out = np.clip(np.nan_to_num(arr * scale), 0, 255).round().astype(np.uint8)
    return Image.fromarray(out, mode="L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited over white."""
    if im.mode == "RGB":
        return im
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        return _to_8bit_grey(im).convert("RGB")
    return im.convert("RGB")


def open_image(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a file path or bytes into an upright RGB image, or raise ImageLoadError(reason)."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageLoadError("empty data (0 bytes)")
        fp: object = io.BytesIO(source)
    else:
        if not os.path.isfile(source):
            raise ImageLoadError("not a file")
        if os.path.getsize(source) == 0:
            raise ImageLoadError("empty file (0 bytes)")
        fp = source
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp)  # reads the header only
        except UnidentifiedImageError:
            raise ImageLoadError("not an image (unrecognised format)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageLoadError("too large (decompression-bomb guard)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageLoadError(f"unreadable header ({exc})") from None
        w, h = im.size
        if w * h > max_pixels:
            raise ImageLoadError(f"too large: {w}x{h} = {w * h} pixels > limit {max_pixels} (decompression-bomb guard)")
        if w == 0 or h == 0:
            raise ImageLoadError(f"empty image ({w}x{h})")
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning) as exc:
            raise ImageLoadError(f"truncated or corrupt ({' '.join(str(exc).split())[:80]})") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block must not lose the pixels: keep the stored orientation
        pass
    return to_rgb(im)


def image_size(source: str | os.PathLike | bytes) -> tuple[int, int] | None:
    """(width, height) read from the header alone, before any pixel is decoded; None when the
    header cannot be read (``open_image`` then gives the reason). Budgets of decoded pixels per
    batch or per request are checked with it, so a small file declaring a huge image costs
    nothing."""
    fp: object = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(fp) as im:
                return im.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None


def is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def image_grid(images, columns: int = 8, scale: int = 1) -> Image.Image:
    """``images`` (a ``[N, 3, H, W]`` tensor in [0, 1], or PIL images of one size) tiled
    ``columns`` per row on white, each ``scale`` x larger (nearest neighbour: pixels stay sharp)."""
    if not isinstance(images, (list, tuple)):
        pixels = (images.clamp(0, 1) * 255).round().to(dtype=torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images = [Image.fromarray(p) for p in pixels]
    w, h = images[0].size
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return grid if scale == 1 else grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
