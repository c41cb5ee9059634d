"""`decode_image` on synthetic files: every PIL mode, sizes, EXIF orientation and each kind of bad input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_model.preprocess import (
    COLOUR_CHROMA,
    MAX_PIXELS,
    ImageDecodeError,
    coloured_share,
    decode_image,
    decode_image_and_colour,
)

SIZE = 32


def gradient(width: int = SIZE, height: int = SIZE) -> np.ndarray:
    """A (H, W) uint8 image with a different value in every corner, so flips and rotations show."""
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    return np.rint(255 * (0.7 * x + 0.3 * y)).astype(np.uint8)


def encode(img: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_args)
    return buf.getvalue()


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_from_rows(width: int, height: int, bit_depth: int, idat: bytes) -> bytes:
    """A grayscale PNG built by hand, so its header can claim any size."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height over a few bytes of pixel data."""
    return png_from_rows(width, height, 8, zlib.compress(b"\x00" * 64))


def png_bomb(side: int) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: tens of kB that decode to side**2 pixels."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    return png_from_rows(side, side, 1, zlib.compress(row * side, 9))


def test_grayscale_png_at_target_size_is_returned_unchanged() -> None:
    arr = gradient()
    out = decode_image(encode(Image.fromarray(arr, "L")), SIZE)
    assert out.shape == (SIZE, SIZE, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, 0], arr)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "CMYK", "YCbCr"])
def test_gray_content_in_any_color_mode_decodes_to_the_same_gray(mode: str) -> None:
    arr = gradient()
    img = Image.fromarray(arr, "L").convert(mode)
    data = encode(img, "TIFF" if mode in ("CMYK", "YCbCr") else "PNG")
    out = decode_image(data, SIZE)[:, :, 0].astype(int)
    # RGB/RGBA/LA hold gray exactly; the palette has 256 entries so P is exact too; CMYK/YCbCr round by a level
    assert np.abs(out - arr).max() <= (0 if mode in ("RGB", "RGBA", "LA", "P") else 2)


def test_rgb_uses_luminance_weights() -> None:
    red = Image.new("RGB", (SIZE, SIZE), (255, 0, 0))
    assert decode_image(encode(red), SIZE)[0, 0, 0] == 76  # ITU-R 601-2: 0.299 * 255


def test_transparent_pixels_become_black() -> None:
    arr = np.full((SIZE, SIZE, 4), 200, np.uint8)
    arr[:, :, 3] = 255
    arr[:, : SIZE // 4, 3] = 0  # transparent
    arr[:, SIZE // 4 : SIZE // 2, 3] = 128  # half transparent: half as bright over black
    out = decode_image(encode(Image.fromarray(arr, "RGBA")), SIZE)[:, :, 0]
    assert (out[:, : SIZE // 4] == 0).all() and (out[:, SIZE // 2 :] == 200).all()
    assert (np.abs(out[:, SIZE // 4 : SIZE // 2].astype(int) - 100) <= 1).all()
    la = Image.fromarray(arr[:, :, [0, 3]], "LA")
    np.testing.assert_array_equal(decode_image(encode(la), SIZE)[:, :, 0], out)


def test_palette_with_transparent_index_becomes_black() -> None:
    arr = np.zeros((SIZE, SIZE), np.uint8)
    arr[:, SIZE // 2 :] = 1
    img = Image.fromarray(arr, "P")
    img.putpalette([10, 10, 10, 180, 180, 180] + [0] * (3 * 254))
    out = decode_image(encode(img, transparency=1), SIZE)[:, :, 0]
    assert (out[:, : SIZE // 2] == 10).all() and (out[:, SIZE // 2 :] == 0).all()
    opaque = decode_image(encode(img), SIZE)[:, :, 0]
    assert (opaque[:, SIZE // 2 :] == 180).all()


def test_sixteen_bit_png_keeps_its_full_range() -> None:
    arr = gradient()
    img16 = Image.fromarray(arr.astype(np.uint16) * 257)  # 8-bit values spread over 0..65535
    data = encode(img16)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    np.testing.assert_array_equal(decode_image(data, SIZE)[:, :, 0], arr)


def test_sixteen_bit_rounding_matches_the_float_formula_for_every_value() -> None:
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = decode_image(encode(Image.fromarray(values)), 256)[:, :, 0]
    expected = np.clip(np.rint(values / 65535.0 * 255.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("bits", [10, 12, 14])
def test_fewer_significant_bits_in_a_sixteen_bit_file_keep_their_grey_levels(bits: int) -> None:
    full = 2**bits - 1
    values = np.linspace(0, full, 128 * 128).round().astype(np.uint16).reshape(128, 128)  # the detector's range
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = decode_image(data, 128)[:, :, 0]  # square at its own size: no resize, the decoder's mapping alone
    np.testing.assert_array_equal(out, np.rint(values.astype(np.float64) * 255 / full).astype(np.uint8))
    assert len(np.unique(out)) == 256  # divided by 65535 instead, 12-bit data keeps 16 grey levels


@pytest.mark.parametrize(("peak", "full"), [(3000, 4095), (4096, 8191), (1023, 1023), (65535, 65535)])
def test_the_full_scale_is_the_smallest_bit_depth_that_holds_the_brightest_pixel(peak: int, full: int) -> None:
    """Not the brightest pixel itself: a 12-bit film whose brightest pixel is 3000 keeps 3000 / 4095 of white."""
    values = np.linspace(0, peak, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    expected = np.rint(values.astype(np.float64) * 255 / full).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(values)), 64)[:, :, 0], expected)
    # the same data in a 32-bit integer TIFF (mode 'I') takes the float path to the same pixels
    wide = Image.fromarray(values.astype(np.int32))
    assert wide.mode == "I"
    np.testing.assert_array_equal(decode_image(encode(wide, "TIFF"), 64)[:, :, 0], expected)


def test_a_wider_integer_image_is_scaled_by_its_peak_and_negatives_are_black() -> None:
    values = np.linspace(-1000, 200_000, 64 * 64).reshape(64, 64).astype(np.int32)
    out = decode_image(encode(Image.fromarray(values), "TIFF"), 64)[:, :, 0]
    np.testing.assert_array_equal(out, np.clip(np.rint(values / 200_000 * 255), 0, 255).astype(np.uint8))


def test_eight_bit_values_in_a_sixteen_bit_file_are_not_black() -> None:
    arr = gradient()
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(arr.astype(np.uint16))), SIZE)[:, :, 0], arr)


def test_one_bit_image_is_black_and_white() -> None:
    arr = np.zeros((SIZE, SIZE), bool)
    arr[:, SIZE // 2 :] = True
    out = decode_image(encode(Image.fromarray(arr)), SIZE)[:, :, 0]
    assert set(np.unique(out)) == {0, 255} and (out[:, SIZE // 2 :] == 255).all()


def test_unconvertible_mode_is_a_decode_error() -> None:
    with pytest.raises(ImageDecodeError, match="unsupported image mode LAB"):
        decode_image(encode(Image.new("LAB", (8, 8)), "TIFF"), SIZE)


@pytest.mark.parametrize(("width", "height"), [(2000, 1600), (1, 1), (5, 300), (SIZE * 3, SIZE)])
def test_any_size_becomes_the_square_model_input(width: int, height: int) -> None:
    arr = gradient(width, height)
    out = decode_image(encode(Image.fromarray(arr, "L"), "JPEG", quality=95), SIZE)
    assert out.shape == (SIZE, SIZE, 1) and out.dtype == np.uint8
    if width > 1 and height > 1:  # the gradient survives the squash: dark top-left, bright bottom-right
        assert int(out[0, 0, 0]) < 40 and int(out[-1, -1, 0]) > 215


def test_large_image_is_antialiased_not_subsampled() -> None:
    stripes = np.zeros((1600, 2000), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: subsampling would give pure black or white
    out = decode_image(encode(Image.fromarray(stripes, "L")), SIZE)[:, :, 0]
    assert 100 < out.mean() < 155 and out.std() < 20


# (EXIF orientation, what the camera did to the upright pixels before storing them)
@pytest.mark.parametrize(("orientation", "stored_as"), [(2, Image.Transpose.FLIP_LEFT_RIGHT),
                                                       (3, Image.Transpose.ROTATE_180),
                                                       (4, Image.Transpose.FLIP_TOP_BOTTOM),
                                                       (5, Image.Transpose.TRANSPOSE),
                                                       (6, Image.Transpose.ROTATE_90),
                                                       (7, Image.Transpose.TRANSVERSE),
                                                       (8, Image.Transpose.ROTATE_270)])
def test_exif_orientation_is_applied(orientation: int, stored_as: Image.Transpose) -> None:
    upright = Image.fromarray(gradient(), "L")
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(encode(upright.transpose(stored_as), exif=exif), SIZE)[:, :, 0]
    np.testing.assert_array_equal(out, np.asarray(upright))


def test_a_malformed_exif_tag_does_not_stop_the_upright_decode() -> None:
    """A file whose orientation reads fine but one of whose other tags is malformed: the Make tag's number turned
    into WhitePoint's, which should hold numbers and holds text. Pillow's `exif_transpose` raises on it (it
    rewrites the EXIF block); the pixels and the orientation are fine, so the image decodes, turned upright."""
    upright = Image.fromarray(gradient(), "L")
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Canon"  # orientation 6: stored turned 90 degrees
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    data = encode(stored, "JPEG", quality=100, exif=exif.tobytes())  # JPEG: no checksum over the EXIF block
    assert data.count(b"\x01\x0f\x00\x02") == 1  # big-endian IFD entry: tag 0x010F (Make), type 2 (text)
    data = data.replace(b"\x01\x0f\x00\x02", b"\x01\x3e\x00\x02")  # tag 0x013E (WhitePoint), still text
    out = decode_image(data, SIZE)[:, :, 0].astype(int)
    assert np.abs(out - np.asarray(upright, int)).mean() < 2  # upright, up to JPEG's rounding
    assert np.abs(out - np.asarray(stored, int)).mean() > 20


def test_an_unreadable_exif_block_is_a_decode_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self):
        raise struct.error("unpack requires a buffer of 4 bytes")

    data = encode(Image.fromarray(gradient(), "L"))
    monkeypatch.setattr(Image.Image, "getexif", broken)
    with pytest.raises(ImageDecodeError, match="unreadable EXIF block"):
        decode_image(data, SIZE)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty input"),
        (b"this is a text file, not an X-ray\n", "not a decodable image"),
        (encode(Image.fromarray(gradient(64, 64), "L"), "JPEG")[:300], "corrupt or truncated"),
        (encode(Image.fromarray(gradient(64, 64), "L"))[:-40], "corrupt or truncated"),
        (png_header_only(8500, 8500), "over the limit"),  # 72M pixels: our own limit
        (png_bomb(20_000), "over the pixel limit"),  # 400M pixels in 48 kB: Pillow's guard
    ],
    ids=["empty", "text", "truncated-jpeg", "truncated-png", "over-limit", "bomb"],
)
def test_bad_input_raises_a_readable_decode_error(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason) as info:
        decode_image(data, SIZE)
    assert isinstance(info.value, ValueError) and len(str(info.value)) < 300


def test_pixel_limit_is_a_parameter() -> None:
    data = encode(Image.fromarray(gradient(40, 40), "L"))
    assert decode_image(data, SIZE, max_pixels=1600).shape == (SIZE, SIZE, 1)
    with pytest.raises(ImageDecodeError, match="40x40 = 1,600 pixels, over the limit of 1,599"):
        decode_image(data, SIZE, max_pixels=1599)
    assert MAX_PIXELS < 8500 * 8500  # the header-only case above really is over the default limit


@pytest.mark.parametrize(("img", "share"), [
    (Image.new("L", (50, 40), 90), 0.0),
    (Image.new("RGB", (50, 40), (90, 90, 90)), 0.0),  # a film stored as RGB, as the dataset's are
    (Image.new("RGB", (50, 40), (90, 90, 90 + COLOUR_CHROMA)), 0.0),  # at the limit: not coloured
    (Image.new("RGB", (50, 40), (90, 90, 91 + COLOUR_CHROMA)), 1.0),
    (Image.new("RGB", (50, 40), (200, 30, 30)).convert("P"), 1.0),
    (Image.new("CMYK", (50, 40), (255, 0, 0, 0)), 1.0),  # cyan
    (Image.new("RGBA", (50, 40), (255, 0, 0, 0)), 0.0),  # transparent red: black, as decode_image composites it
    (Image.new("RGBA", (50, 40), (255, 0, 0, 255)), 1.0),
])
def test_coloured_share_counts_pixels_whose_channels_differ(img: Image.Image, share: float) -> None:
    assert coloured_share(img) == share


def test_coloured_share_is_measured_on_the_decoded_image_and_grey_films_read_zero() -> None:
    half = np.full((64, 128, 3), 100, np.uint8)
    half[:, 64:] = (250, 40, 40)
    _, share = decode_image_and_colour(encode(Image.fromarray(half, "RGB")), SIZE)
    assert share == 0.5
    gray, share = decode_image_and_colour(encode(Image.fromarray(half[:, :64], "RGB")), SIZE)
    assert share == 0.0 and gray.shape == (SIZE, SIZE, 1)


@pytest.mark.integration
def test_every_real_film_in_the_subset_is_grey(real_subset: Path) -> None:
    files = sorted(real_subset.rglob("*.jpeg"))
    assert len(files) == 96
    assert max(coloured_share(Image.open(f)) for f in files) == 0.0  # all 5,840: 0 too (the serving module's note)


def test_coloured_share_averages_so_thin_lines_and_noise_do_not_alias() -> None:
    base = np.full((512, 512, 3), 120, np.uint8)
    shares = set()
    for phase in range(4):  # a grid of 1-pixel red lines every 16 rows, wherever it starts
        grid = base.copy()
        grid[phase::16] = (230, 20, 20)
        shares.add(coloured_share(Image.fromarray(grid, "RGB")))
    assert len(shares) == 1  # a sample would read it as all colour or none, by where the lines fall
    noisy = np.clip(120 + np.random.default_rng(0).normal(0, 15, (512, 512, 3)), 0, 255).astype(np.uint8)
    assert coloured_share(Image.fromarray(noisy, "RGB")) == 0.0  # per-channel sensor noise is not colour
