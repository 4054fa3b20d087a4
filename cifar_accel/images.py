"""Images as what they are: every Pillow mode becomes the 8-bit RGB it depicts, or is refused in one line.

``image.convert("RGB")`` alone is wrong for several modes Pillow opens: it clips 16-bit
greyscale (PNG, TIFF) and 32-bit integer images at 255 instead of scaling them, truncates
[0, 1] floats to 0 or 1, and warns about palette images with transparency. Training
(``data.decode_split``), ``ImageClassifier.predict`` and ``cifar-accel predict`` all read
images through this module, so a model sees the same pixels wherever an image comes from.

=================================  ==========================================================
mode                               becomes
=================================  ==========================================================
RGB                                itself
1, L                               grey RGB (1: 0 or 255)
P, PA                              the palette's colours; transparency is dropped
LA, La, RGBA, RGBa                 the colour without its alpha (premultiplied modes are
                                   un-premultiplied first), as ``datasets`` (``mode="RGB"``)
                                   and ``transformers.image_transforms.convert_to_rgb`` do
RGBX, CMYK, YCbCr, HSV             Pillow's conversion
LAB                                sRGB through LittleCMS (``ImageCms``, D50 Lab); refused
                                   where Pillow was built without it
I;16, I;16B, I;16L, I;16N          grey, ``round(value / 257)``: 0 to 65535 onto 0 to 255
I (32-bit integers)                as 16-bit when every value is in [0, 65535] (Pillow opens
                                   16-bit PGM, and 16-bit PNG before 10.3, as I); refused
                                   otherwise
F (32-bit floats)                  grey, ``round(value * 255)`` when every value is in
                                   [0, 1]; refused when not, or when not finite
=================================  ==========================================================

An EXIF orientation is applied, as ``datasets`` does when it decodes an image. Files with
more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` are refused before they are decoded (Pillow
only warns up to twice that), and Pillow's warnings about files it still reads are not passed
on: what the user must act on is a refusal, in one line.

``resized`` is the one resize (bilinear, antialiased) that ``--image_size`` training, evaluation and
``predict`` share.
"""

import io
import os
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from cifar_accel.errors import UserError

# Part of the decoded-image cache's file name: bump it whenever to_rgb's pixels change,
# so caches decoded by an older rule are not reused.
DECODING_VERSION = 2

ImageSource = str | os.PathLike | bytes | IO[bytes]

# What Pillow raises for a file it cannot identify or decode (truncated data, bad chunks).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
# Modes whose conversion to RGB Pillow gets right (alpha is simply dropped).
_PILLOW_CONVERTS = ("1", "L", "LA", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "HSV")


@contextmanager
def _pillow_quiet() -> Iterator[None]:
    """Pillow's warnings would otherwise reach the user once per image; a bomb warning becomes an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def open_image(source: ImageSource, where: str) -> Image.Image:
    """Open ``source`` (a path, bytes or a binary file) lazily: its size is known, its pixels not yet decoded.

    ``where`` names the image in messages, e.g. ``"the image in row 12 of split 'train'"`` or
    ``"image cat.png"``. Unidentifiable files and decompression bombs are refused here; data that
    is broken further in is refused by ``to_rgb`` when the pixels are decoded.
    """
    if isinstance(source, bytes | bytearray):
        source = io.BytesIO(source)
    elif isinstance(source, str | os.PathLike) and os.path.exists(source) and not os.path.isfile(source):
        # A folder, a FIFO or a device: reading one would fail, or wait forever.
        raise UserError(f"{where} cannot be read (not a regular file)")
    try:
        with _pillow_quiet():
            return Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UserError(f"{where} is refused as a possible decompression bomb ({error})") from None
    except UnidentifiedImageError:  # its message repeats the path, or names a BytesIO object
        raise UserError(f"{where} cannot be decoded (not an image format Pillow can read)") from None
    except _DECODE_ERRORS as error:
        if isinstance(error, OSError) and error.errno is not None:  # the file itself: missing, a folder, no access
            raise UserError(f"{where} cannot be read ({error.strerror})") from None
        raise UserError(f"{where} cannot be decoded ({error})") from None


def to_rgb(image: Image.Image, where: str) -> Image.Image:
    """A new 8-bit RGB image of what ``image`` depicts (see the module's table); the input is not changed.

    ``where`` names the image in every refusal (see ``open_image``).
    """
    with _pillow_quiet():
        try:
            image.load()
        except _DECODE_ERRORS as error:
            raise UserError(f"{where} cannot be decoded ({error})") from None
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)
        return _convert(image, where)


def _convert(image: Image.Image, where: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in _PILLOW_CONVERTS:
        return image.convert("RGB")
    if mode == "P":
        # Through RGBA: a direct conversion warns when the transparency is given per palette entry.
        return image.convert("RGBA" if "transparency" in image.info else "RGB").convert("RGB")
    if mode in ("La", "RGBa"):  # un-premultiply, or the colours come out darkened by their alpha
        return image.convert(mode.upper()).convert("RGB")
    if mode == "LAB":
        return _lab_to_rgb(image, where)
    if mode in _SIXTEEN_BIT:
        return _grey(_sixteen_to_eight(np.asarray(image)))
    if mode == "I":
        values = np.asarray(image)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise UserError(
                f"{where} is mode I (32-bit integers) with values from {low} to {high}; only images whose values "
                f"are all in [0, 65535] can be read (as 16-bit)"
            )
        return _grey(_sixteen_to_eight(values))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise UserError(f"{where} is mode F (32-bit floats) with NaN or infinite values; only [0, 1] can be read")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 1:
            raise UserError(
                f"{where} is mode F (32-bit floats) with values from {low:g} to {high:g}; only images whose "
                f"values are all in [0, 1] can be read"
            )
        return _grey(np.rint(values * 255).astype(np.uint8))
    raise UserError(f"{where} is mode {mode!r}, which cannot be converted to RGB")


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    # round(value / 257) in integers: 257 * k maps back to exactly k (257 is odd, so no ties).
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _grey(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values).convert("RGB")  # uint8 [H, W] is mode L


def _lab_to_rgb(image: Image.Image, where: str) -> Image.Image:
    # Explicitly through LittleCMS: Pillow's convert() does the same only since 9.4, and Pillow is not pinned.
    try:
        from PIL import ImageCms
    except ImportError:
        raise UserError(
            f"{where} is mode LAB, and this Pillow was built without LittleCMS (PIL.ImageCms) to convert it"
        ) from None
    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return ImageCms.applyTransform(image, transform)


def resized(image: torch.Tensor, height: int, width: int, interpolation: str = "bilinear") -> torch.Tensor:
    """A uint8 ``C x H x W`` image at ``height x width`` (itself when it already is): antialiased, bilinear or as
    named (a Hub model's own: "bicubic" for most timm models)."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    mode = v2.InterpolationMode(interpolation)
    return v2.functional.resize(image, [height, width], interpolation=mode, antialias=True)
