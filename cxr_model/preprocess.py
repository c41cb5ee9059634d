"""The one image decoder: bytes of any format, size or mode in, a square uint8 grayscale array out.

Training, the decoded-image cache and the served model all call `decode_image`, so a file gives the
same pixels wherever it is read.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Decompression-bomb guard: about 8.4k x 8.4k. Scanner exports are ~3k x 3k, so this is generous.
MAX_PIXELS = 70_000_000

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image, or the image breaks a limit."""


# Bumped whenever a file's decoded pixels change, so that the decode cache (`cxr_model.cache`) does not hand out
# arrays from the old decoder. 2: 16-bit containers scaled by their significant bits, not always by 65535.
DECODER_VERSION = 2


def _full_scale(mode: str, arr: np.ndarray) -> int | float:
    """The value that maps to white.

    A 16-bit container ('I;16*', or 'I' with values up to 65535) often holds fewer significant bits: a 12-bit
    detector's export stores 0..4095, which divided by 65535 would leave 16 grey levels. The full scale is the
    smallest 2**b - 1 (b >= 8) that holds the brightest pixel, so 12-bit data spans 0..255 and 16-bit data is
    divided by 65535 as before. The model standardizes each image (`--intensity standardize`, the default, or
    `equalize`), so only the grey levels kept matter, not the brightness this implies; under `--intensity
    rescale` a film whose brightest pixel crosses a power of two reads half as bright, and one hot pixel at
    65535 scales a 12-bit film as 16-bit data. Wider 'I' and float ('F') images have no fixed range: their peak.
    """
    peak = float(arr.max()) if arr.size else 0.0
    if mode.startswith("I;16") or (mode == "I" and peak <= 65535):
        return 2 ** max(8, int(max(peak, 0)).bit_length()) - 1
    return max(peak, 1e-12)


def _to_grayscale(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit 'L' without losing the 16-bit range or compositing artefacts."""
    if img.mode.startswith("I;16"):
        # round(x * 255 / full) in integers: the same values as the float path below, without a float64 copy
        arr = np.asarray(img).astype(np.uint32)
        full = _full_scale(img.mode, arr)
        return Image.fromarray(((arr * 255 + full // 2) // full).astype(np.uint8))
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(arr / _full_scale(img.mode, arr) * 255.0), 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become black, the background of a radiograph.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode == "1":
        img = img.convert("L")
    return img.convert("L") if img.mode != "L" else img


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode image bytes; raise ImageDecodeError with a readable reason otherwise."""
    if not data:
        raise ImageDecodeError("empty input (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise ImageDecodeError(
                f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
            )
        img.load()  # full decode: catches truncated files that open() alone accepts
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard, at twice its warning size
        raise ImageDecodeError(f"image is over the pixel limit ({exc})") from exc
    except UnidentifiedImageError:
        # Pillow's message names only the BytesIO object; the first bytes say more about what was sent.
        raise ImageDecodeError(f"not a decodable image (unknown format; starts with {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image ({exc})") from exc
    return img


def _grayscale(img: Image.Image) -> Image.Image:
    """`_to_grayscale`, with a mode it cannot convert reported as an ImageDecodeError."""
    try:
        return _to_grayscale(img)
    except ValueError as exc:  # a mode Pillow cannot convert, such as LAB
        raise ImageDecodeError(f"unsupported image mode {img.mode} ({exc})") from exc


def check_convertible(img: Image.Image) -> None:
    """Raise ImageDecodeError if `decode_image` could not turn this opened image into grayscale (its mode).

    Converts one pixel, not the image, so indexing a dataset stays as cheap as opening it.
    """
    _grayscale(img.crop((0, 0, 1, 1)))


_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the stored pixels upright (as ImageOps.exif_transpose)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def exif_orientation(img: Image.Image) -> int:
    """The image's EXIF orientation (1 = stored upright); ImageDecodeError if its EXIF block cannot be read.

    A value outside 1-8 counts as 1, as in Pillow's `exif_transpose`.
    """
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception as exc:  # Pillow raises many kinds (struct.error, TypeError, ...) on a malformed block
        raise ImageDecodeError(f"unreadable EXIF block ({type(exc).__name__}: {exc})") from exc
    return orientation if orientation in _UPRIGHT else 1


def upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says.

    Not `ImageOps.exif_transpose`: that also rewrites the EXIF block of the copy, which raises (TypeError,
    AttributeError, struct.error) on some malformed tags of files whose pixels and orientation read fine.
    """
    orientation = exif_orientation(img)
    return img if orientation == 1 else img.transpose(_UPRIGHT[orientation])


# A pixel is coloured when its channels differ by more than this (0..255). The 5,840 films of the dataset, stored
# as RGB JPEG, differ by 0 everywhere; an exported film with JPEG chroma noise stays far under it.
COLOUR_CHROMA = 32
_COLOUR_SIDE = 128  # the share is measured on box averages of the image down to about this side (at least)


def coloured_share(img: Image.Image) -> float:
    """The share of pixels (0..1) whose channels differ by more than `COLOUR_CHROMA`, measured on box averages.

    Averaging (by a whole factor, to a side of 128-255 pixels) rather than sampling: a sample would count a grid
    of thin coloured lines as all colour or none depending on where it falls, and per-channel sensor noise as
    colour; averages thin lines out and counts coloured areas. 0 for grey modes. Transparent pixels count as
    black, as `decode_image` composites them.
    """
    if img.mode not in ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr"):
        return 0.0
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # palette indices are not colours to average
    factor = max(1, min(img.size) // _COLOUR_SIDE)
    small = img.reduce(factor) if factor > 1 else img  # the share: ~2 ms for a 2000x1600 RGB scan (decoding ~15)
    if small.mode == "RGBA":
        small = Image.alpha_composite(Image.new("RGBA", small.size, (0, 0, 0, 255)), small)
    rgb = np.asarray(small.convert("RGB"), dtype=np.int16)
    return float(((rgb.max(axis=-1) - rgb.min(axis=-1)) > COLOUR_CHROMA).mean())


def decode_image(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to a (size, size, 1) uint8 grayscale array."""
    return _square_grey(upright(open_image(data, max_pixels=max_pixels)), size)


def decode_image_and_colour(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, float]:
    """`decode_image`, and the image's `coloured_share` (measured before it is made grey), for serving: training
    and the decode cache do not pay for the share."""
    img = upright(open_image(data, max_pixels=max_pixels))
    return _square_grey(img, size), coloured_share(img)


def _square_grey(img: Image.Image, size: int) -> np.ndarray:
    """An opened, upright image as a (size, size, 1) uint8 grayscale array."""
    gray = _grayscale(img)
    if gray.size != (size, size):
        # Squash to a square as the resized dataset does; BILINEAR with PIL's support scaling antialiases.
        gray = gray.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(gray, dtype=np.uint8)[:, :, None]  # (S, S, 1)


def decode_file(path: str | Path, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """`decode_image` on a file's bytes."""
    return decode_image(Path(path).read_bytes(), size, max_pixels=max_pixels)
