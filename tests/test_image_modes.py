"""Images are read as what they are: every mode Pillow opens becomes the 8-bit RGB it depicts, in a
dataset row and in predict alike, or is refused in one line naming the row or the file.

Expected pixels are computed here from known 8-bit arrays (a 16-bit image is that array times 257,
a float image that array over 255, colour spaces from their published formulas), never by the
conversion under test.
"""

import colorsys
import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import cifar_accel_command, replace_column_values, run_command, write_hub_layout
from datasets import load_dataset
from PIL import Image

from cifar_accel import ImageClassifier
from cifar_accel.cli import predict_main
from cifar_accel.config import TrainConfig
from cifar_accel.data import decode_split, load_data
from cifar_accel.errors import UserError
from cifar_accel.images import open_image, to_rgb

# A warning Pillow lets through (e.g. about palette transparency) fails the test that caused it.
pytestmark = pytest.mark.filterwarnings("error")

SIZE = (32, 32)
_rng = np.random.default_rng(7)
COLOUR = _rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
GREY = _rng.integers(0, 256, (32, 32), dtype=np.uint8)
GREY[0, :2] = 0, 255  # both ends of the range
ALPHA = _rng.integers(0, 256, (32, 32), dtype=np.uint8)
PALETTE = _rng.integers(0, 256, (16, 3), dtype=np.uint8)
INDICES = _rng.integers(0, 16, (32, 32), dtype=np.uint8)
# Premultiplied pixels: alpha 51 (= 255 / 5) on half of them, values that are multiples of 5, so the
# stored value * 255 / alpha is exact.
PREMULTIPLIED_ALPHA = np.where(_rng.random((32, 32)) < 0.5, 51, 255).astype(np.uint8)


def as_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def encode(image: Image.Image, file_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=file_format, **options)
    return buffer.getvalue()


def read(source, where: str = "the test image") -> np.ndarray:
    with open_image(source, where) as image:
        return np.asarray(to_rgb(image, where))


def palette_image(transparency: bytes | int | None = None) -> Image.Image:
    image = Image.frombytes("P", SIZE, INDICES.tobytes())
    image.putpalette(PALETTE.tobytes())
    if transparency is not None:
        image.info["transparency"] = transparency
    return image


def palette_with_alpha() -> Image.Image:
    image = palette_image().convert("PA")
    image.putalpha(Image.fromarray(ALPHA))
    return image


def premultiplied(mode: str, straight: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """A premultiplied (La, RGBa) image of ``straight`` rounded down to multiples of 5, and the RGB it depicts."""
    values = straight // 5 * 5
    alpha = PREMULTIPLIED_ALPHA if values.ndim == 2 else PREMULTIPLIED_ALPHA[..., None]
    stored = np.where(alpha == 51, values // 5, values).astype(np.uint8)
    channels = [stored] if values.ndim == 2 else [stored[..., i] for i in range(3)]
    image = Image.frombytes(mode, SIZE, np.dstack([*channels, PREMULTIPLIED_ALPHA]).tobytes())
    return image, values if values.ndim == 3 else as_rgb(values)


def ycbcr_of(rgb: np.ndarray) -> np.ndarray:
    """JPEG/JFIF full-range YCbCr (ITU-T T.871)."""
    red, green, blue = (rgb[..., channel].astype(np.float64) for channel in range(3))
    luma = 0.299 * red + 0.587 * green + 0.114 * blue
    blue_difference = 128 - 0.168736 * red - 0.331264 * green + 0.5 * blue
    red_difference = 128 + 0.5 * red - 0.418688 * green - 0.081312 * blue
    return np.clip(np.rint(np.dstack([luma, blue_difference, red_difference])), 0, 255).astype(np.uint8)


def hsv_of(rgb: np.ndarray) -> np.ndarray:
    hsv = [colorsys.rgb_to_hsv(*(pixel / 255)) for pixel in rgb.reshape(-1, 3)]
    return np.rint(np.array(hsv) * 255).astype(np.uint8).reshape(rgb.shape)


def srgb_of_lightness(lightness: float) -> float:
    """The sRGB level (0-255) of a neutral grey of CIE lightness L* (CIE 15, IEC 61966-2-1)."""
    luminance = ((lightness + 16) / 116) ** 3 if lightness > 8 else lightness / 903.3
    return 255 * (12.92 * luminance if luminance <= 0.0031308 else 1.055 * luminance ** (1 / 2.4) - 0.055)


# CIE L*a*b* (D50) patches and their sRGB, one per row of the image; red is sRGB (255, 0, 0) in D50 Lab.
LAB_PATCHES = [((100.0, 0.0, 0.0), (255, 255, 255)), ((0.0, 0.0, 0.0), (0, 0, 0)),
               ((128 * 100 / 255, 0.0, 0.0), (round(srgb_of_lightness(128 * 100 / 255)),) * 3),
               ((54.29, 80.80, 69.89), (255, 0, 0))]  # fmt: skip


def lab_image() -> tuple[Image.Image, np.ndarray]:
    """A LAB image as TIFF stores it (L* scaled to 0-255, a* and b* as signed bytes), and its sRGB."""
    rows = []
    for (lightness, a, b), _ in LAB_PATCHES:
        signed = np.array([a, b]).round().astype(np.int8).view(np.uint8)
        rows.append(np.array([round(lightness * 255 / 100), *signed], dtype=np.uint8))
    raw = np.repeat(np.array(rows)[:, None, :], 32, axis=1).repeat(8, axis=0)
    expected = np.repeat(np.array([rgb for _, rgb in LAB_PATCHES], dtype=np.uint8)[:, None, :], 32, axis=1)
    return Image.frombytes("LAB", SIZE, raw.tobytes()), expected.repeat(8, axis=0)


def png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written byte by byte: 16-bit colour, which Pillow cannot write, or a header that lies."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png16(pixels: np.ndarray) -> bytes:
    colour_type = {2: 4, 3: 2, 4: 6}[pixels.shape[2]]  # grey + alpha, RGB, RGBA
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return png(pixels.shape[1], pixels.shape[0], 16, colour_type, rows)


BOMB = png(100_000, 100_000, 8, 2, b"")  # 10^10 pixels claimed, a few bytes on disk
GREY16 = GREY.astype(np.uint16) * 257

# mode: (the image, the RGB it depicts, largest allowed difference per channel)
IMAGES_IN_MEMORY = {
    "1": lambda: (Image.fromarray(GREY > 127), as_rgb(np.where(GREY > 127, 255, 0)), 0),
    "L": lambda: (Image.fromarray(GREY), as_rgb(GREY), 0),
    "P": lambda: (palette_image(), PALETTE[INDICES], 0),
    "P, transparency in bytes": lambda: (palette_image(bytes([0] * 5 + [255] * 11)), PALETTE[INDICES], 0),
    "P, transparent index": lambda: (palette_image(3), PALETTE[INDICES], 0),
    "PA": lambda: (palette_with_alpha(), PALETTE[INDICES], 0),
    "LA": lambda: (Image.fromarray(np.dstack([GREY, ALPHA])), as_rgb(GREY), 0),
    "La": lambda: (*premultiplied("La", GREY), 0),
    "RGB": lambda: (Image.fromarray(COLOUR), COLOUR, 0),
    "RGBA": lambda: (Image.fromarray(np.dstack([COLOUR, ALPHA])), COLOUR, 0),
    "RGBa": lambda: (*premultiplied("RGBa", COLOUR), 0),
    "RGBX": lambda: (Image.frombytes("RGBX", SIZE, np.dstack([COLOUR, ALPHA]).tobytes()), COLOUR, 0),
    "CMYK": lambda: (Image.frombytes("CMYK", SIZE, np.dstack([255 - COLOUR, 0 * GREY]).tobytes()), COLOUR, 0),
    "YCbCr": lambda: (Image.frombytes("YCbCr", SIZE, ycbcr_of(COLOUR).tobytes()), COLOUR, 3),
    "HSV": lambda: (Image.frombytes("HSV", SIZE, hsv_of(COLOUR).tobytes()), COLOUR, 4),
    "LAB": lambda: (*lab_image(), 6),
    "I;16": lambda: (Image.frombytes("I;16", SIZE, GREY16.astype("<u2").tobytes()), as_rgb(GREY), 0),
    "I;16B": lambda: (Image.frombytes("I;16B", SIZE, GREY16.astype(">u2").tobytes()), as_rgb(GREY), 0),
    "I;16L": lambda: (Image.frombytes("I;16L", SIZE, GREY16.astype("<u2").tobytes()), as_rgb(GREY), 0),
    "I;16N": lambda: (Image.frombytes("I;16N", SIZE, GREY16.astype("=u2").tobytes()), as_rgb(GREY), 0),
    "I": lambda: (Image.fromarray(GREY16.astype(np.int32)), as_rgb(GREY), 0),
    "F": lambda: (Image.fromarray(GREY.astype(np.float32) / 255), as_rgb(GREY), 0),
}


@pytest.mark.parametrize("case", IMAGES_IN_MEMORY)
def test_every_mode_becomes_the_rgb_it_depicts(case):
    image, expected, tolerance = IMAGES_IN_MEMORY[case]()
    assert image.mode == case.split(",")[0]
    before = image.tobytes()
    rgb = to_rgb(image, "the test image")
    assert rgb.mode == "RGB" and rgb.size == SIZE and rgb is not image
    assert int(np.abs(np.asarray(rgb).astype(int) - expected).max()) <= tolerance
    assert image.tobytes() == before  # the caller's image is left as it was


def test_sixteen_bits_are_scaled_to_eight_with_rounding():
    values = np.arange(0, 65536, 7, dtype=np.uint16)[: 96 * 96].reshape(96, 96)
    image = Image.frombytes("I;16", (96, 96), values.astype("<u2").tobytes())
    expected = np.floor(values / 257 + 0.5)  # no ties: 257 is odd
    assert np.array_equal(np.asarray(to_rgb(image, "x"))[..., 0], expected)
    assert to_rgb(Image.new("I;16", (2, 1), 65535), "x").getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (GREY16.astype(np.int32) - 1, r"mode I \(32-bit integers\) with values from -1 to 65534; .*\[0, 65535\]"),
        (GREY16.astype(np.int32) + 70_000, r"mode I \(32-bit integers\) with values from 70000 to 135535"),
        (GREY.astype(np.float32), r"mode F \(32-bit floats\) with values from 0 to 255; .*\[0, 1\]"),
        (np.where(GREY > 100, np.nan, 0.5).astype(np.float32), r"mode F \(32-bit floats\) with NaN or infinite"),
        (np.where(GREY > 100, np.inf, 0.5).astype(np.float32), r"mode F \(32-bit floats\) with NaN or infinite"),
    ],
    ids=["negative integers", "integers over 16 bits", "floats over 1", "NaN", "infinity"],
)
def test_values_that_are_not_a_picture_are_refused_in_one_line(values, message):
    with pytest.raises(UserError, match=f"^image cat.tiff is {message}") as refused:
        to_rgb(Image.fromarray(values), "image cat.tiff")
    assert "\n" not in str(refused.value)


def test_lab_needs_littlecms_and_says_so(monkeypatch):
    import PIL

    # As where Pillow was built without LittleCMS: importing PIL.ImageCms fails.
    monkeypatch.delattr(PIL, "ImageCms", raising=False)
    monkeypatch.setitem(sys.modules, "PIL.ImageCms", None)
    with pytest.raises(UserError, match="^the test image is mode LAB, and this Pillow was built without LittleCMS"):
        to_rgb(lab_image()[0], "the test image")


def test_exif_orientation_is_applied_as_datasets_shows_the_image():
    from datasets import Image as ImageFeature

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image is shown turned 90 degrees clockwise
    encoded = encode(Image.fromarray(COLOUR[:, :16]), "PNG", exif=exif)
    assert np.array_equal(read(encoded), np.rot90(COLOUR[:, :16], k=-1))
    assert np.array_equal(read(encoded), np.asarray(ImageFeature().decode_example({"bytes": encoded, "path": None})))


@pytest.mark.parametrize("limit", [600, 100], ids=["Pillow would only warn", "Pillow refuses"])
def test_images_over_the_pixel_limit_are_refused_before_decoding(monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)  # 32x32 = 1024 pixels: over 600, over 2 x 100
    with pytest.raises(UserError, match="^image big.png is refused as a possible decompression bomb"):
        open_image(encode(Image.fromarray(COLOUR), "PNG"), "image big.png")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (BOMB, "is refused as a possible decompression bomb"),
        (b"these bytes are not an image", r"cannot be decoded \(not an image format Pillow can read\)$"),
        (encode(Image.fromarray(COLOUR), "PNG")[:300], r"cannot be decoded \("),
        ("/no/such/picture.png", r"cannot be read \(No such file or directory\)$"),
    ],
    ids=["bomb", "not an image", "truncated", "missing file"],
)
def test_files_that_cannot_be_read_are_refused_in_one_line(source, message):
    with pytest.raises(UserError, match=f"^image x.png {message}") as refused:
        read(source, "image x.png")
    assert "\n" not in str(refused.value)


# Dataset rows as files arrive in them: (encoded file, the RGB it depicts, largest allowed difference).
FILES = {
    "1 (PNG)": (encode(Image.fromarray(GREY > 127), "PNG"), as_rgb(np.where(GREY > 127, 255, 0)), 0),
    "L (PNG)": (encode(Image.fromarray(GREY), "PNG"), as_rgb(GREY), 0),
    "P with transparency (PNG)": (encode(palette_image(bytes([0] * 5 + [255] * 11)), "PNG"), PALETTE[INDICES], 0),
    "PA (TIFF)": (encode(palette_with_alpha(), "TIFF"), PALETTE[INDICES], 0),
    "LA (PNG)": (encode(Image.fromarray(np.dstack([GREY, ALPHA])), "PNG"), as_rgb(GREY), 0),
    "RGBA (PNG)": (encode(Image.fromarray(np.dstack([COLOUR, ALPHA])), "PNG"), COLOUR, 0),
    "16-bit grey (PNG)": (encode(Image.fromarray(GREY16), "PNG"), as_rgb(GREY), 0),
    "16-bit grey and alpha (PNG)": (png16(np.dstack([GREY16, GREY16])), as_rgb(GREY), 0),
    "16-bit RGB (PNG)": (png16(COLOUR.astype(np.uint16) * 257), COLOUR, 0),
    "16-bit RGBA (PNG)": (png16(np.dstack([COLOUR, ALPHA]).astype(np.uint16) * 257), COLOUR, 0),
    "I;16B (TIFF)": (encode(Image.frombytes("I;16B", SIZE, GREY16.astype(">u2").tobytes()), "TIFF"), as_rgb(GREY), 0),
    "I (TIFF)": (encode(Image.fromarray(GREY16.astype(np.int32)), "TIFF"), as_rgb(GREY), 0),
    "F (TIFF)": (encode(Image.fromarray(GREY.astype(np.float32) / 255), "TIFF"), as_rgb(GREY), 0),
    "CMYK (TIFF)": (encode(IMAGES_IN_MEMORY["CMYK"]()[0], "TIFF"), COLOUR, 0),
    "YCbCr (TIFF)": (encode(IMAGES_IN_MEMORY["YCbCr"]()[0], "TIFF"), COLOUR, 3),
    "LAB (TIFF)": (encode(lab_image()[0], "TIFF"), lab_image()[1], 6),
}


@pytest.fixture(scope="module")
def every_file_dataset(tmp_path_factory) -> Path:
    """A Hub-layout dataset whose first training rows hold FILES, in order."""
    root = write_hub_layout(tmp_path_factory.mktemp("modes"), {"train": 20, "test": 4}, ["a", "b", "c", "d"])
    rows = {row: {"bytes": encoded, "path": None} for row, (encoded, _, _) in enumerate(FILES.values())}
    replace_column_values(root, "train", "img", rows)
    return root


def test_dataset_rows_in_every_file_mode_decode_to_the_rgb_they_depict(every_file_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_ACCEL_CACHE", str(tmp_path))
    split = load_dataset(str(every_file_dataset))["train"]
    images, labels = decode_split(split, "img", "label", split_name="train")
    assert images.shape == (20, 3, 32, 32) and labels.tolist() == [row % 4 for row in range(20)]
    for row, (name, (_, expected, tolerance)) in enumerate(FILES.items()):
        difference = np.abs(images[row].permute(1, 2, 0).numpy().astype(int) - expected)
        assert int(difference.max()) <= tolerance, name
    assert [path.suffix for path in tmp_path.iterdir()] == [".safetensors"]  # the cache, and no temporary file


def test_training_statistics_use_the_same_pixels(every_file_dataset):
    data = load_data(TrainConfig(dataset=str(every_file_dataset)))
    assert data.mean == load_data(TrainConfig(dataset=str(every_file_dataset))).mean  # from the decoded cache
    assert all(0 < value < 1 for value in data.mean + data.std)


NOT_32 = png(5000, 5000, 8, 0, b"")  # 25 million pixels (under the bomb limit), and no pixel data at all


def stored(encoded: bytes | None) -> dict:
    return {"bytes": encoded, "path": None}


# case: (split, column, row, the value written there, the message)
BAD_ROWS = {
    "undecodable": (
        "train",
        "img",
        1,
        stored(b"not an image"),
        "the image in row 1 of split 'train' cannot be decoded",
    ),
    "null image": ("train", "img", 4, None, r"the image in row 4 of split 'train' is missing \(null\)"),
    "image with neither bytes nor path": (
        "train",
        "img",
        2,
        stored(None),
        r"the image in row 2 of split 'train' is missing \(null\)",
    ),
    "null label": ("train", "label", 5, None, r"the label in row 5 of split 'train' is missing \(null\) \(1 such"),
    "null label in the eval split": ("test", "label", 2, None, r"the label in row 2 of split 'test' is missing"),
    "mode I beyond 16 bits": (
        "train",
        "img",
        3,
        stored(encode(Image.fromarray(GREY16.astype(np.int32) * 2), "TIFF")),
        r"the image in row 3 of split 'train' is mode I \(32-bit integers\) with values from 0 to 131070",
    ),
    "mode F beyond 1": (
        "train",
        "img",
        6,
        stored(encode(Image.fromarray(GREY.astype(np.float32)), "TIFF")),
        r"the image in row 6 of split 'train' is mode F \(32-bit floats\) with values from 0 to 255",
    ),
    "decompression bomb": (
        "train",
        "img",
        7,
        stored(BOMB),
        "the image in row 7 of split 'train' is refused as a possible",
    ),
    # Refused from its header: decoding the (missing) pixels would say "cannot be decoded" instead.
    "not 32x32": (
        "train",
        "img",
        2,
        stored(NOT_32),
        r"images must be 32x32 pixels; the image in row 2 of split 'train' is 5000x5000 \(width x height; train with",
    ),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_a_bad_row_is_refused_in_one_line_naming_it(tmp_path, monkeypatch, case):
    split, column, row, value, message = BAD_ROWS[case]
    root = write_hub_layout(tmp_path / "data", {"train": 8, "test": 4}, ["a", "b"])
    replace_column_values(root, split, column, {row: value})
    monkeypatch.setenv("CIFAR_ACCEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=f"^{message}") as refused:
        load_data(TrainConfig(dataset=str(root)))
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # no cache, no .tmp


def test_rows_are_named_as_in_the_split_after_a_selection_reorders_them(tmp_path, monkeypatch):
    root = write_hub_layout(tmp_path, {"train": 12, "test": 4}, ["a", "b"])
    replace_column_values(root, "train", "img", {9: None})
    replace_column_values(root, "test", "label", {1: None})
    monkeypatch.setenv("CIFAR_ACCEL_CACHE", str(tmp_path / "cache"))
    splits = load_dataset(str(root))
    shuffled = splits["train"].select([4, 11, 9, 0])  # row 9 of the split is the third here
    with pytest.raises(UserError, match=r"^the image in row 9 of split 'train' is missing \(null\)"):
        decode_split(shuffled, "img", "label", split_name="train")
    # The evaluation path decodes without check_labels: a null label is refused there too.
    with pytest.raises(UserError, match=r"^the label in row 1 of split 'test' is missing \(null\)"):
        decode_split(splits["test"], "img", "label", split_name="test")


def test_an_interrupted_cache_write_leaves_no_temporary_file(colour_dataset, tmp_path, monkeypatch):
    import cifar_accel.data.decode_cache

    def write_half_then_stop(tensors, filename):
        Path(filename).write_bytes(b"half a safetensors file")
        raise KeyboardInterrupt

    monkeypatch.setattr(cifar_accel.data.decode_cache, "save_file", write_half_then_stop)
    monkeypatch.setenv("CIFAR_ACCEL_CACHE", str(tmp_path))
    split = load_dataset(str(colour_dataset))["test"]
    with pytest.raises(KeyboardInterrupt):
        decode_split(split, "img", "label")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)  # untrained: different pixels give different scores, which is all these tests need
    folder = tmp_path_factory.mktemp("model")
    ImageClassifier("simple_cnn", 4, ["red", "green", "blue", "yellow"], [0.5] * 3, [0.25] * 3).save_pretrained(folder)
    return folder


def test_predict_sees_the_pixels_training_sees(saved_model):
    from cifar_accel import load_model

    model = load_model(saved_model)
    grey, palette = Image.fromarray(as_rgb(GREY)), Image.fromarray(PALETTE[INDICES])
    sixteen_bit = Image.frombytes("I;16", SIZE, GREY16.astype("<u2").tobytes())
    transparent_palette = palette_image(bytes([0] * 5 + [255] * 11))
    assert model.predict([sixteen_bit, transparent_palette], top_k=4) == model.predict([grey, palette], top_k=4)
    assert model.predict(sixteen_bit, top_k=4) != model.predict(Image.fromarray(as_rgb(GREY // 2)), top_k=4)


def test_predict_command_reads_16_bit_and_transparent_palette_files(saved_model, tmp_path):
    from cifar_accel import load_model

    sixteen_bit, transparent = tmp_path / "sixteen.png", tmp_path / "transparent.png"
    sixteen_bit.write_bytes(FILES["16-bit grey (PNG)"][0])
    transparent.write_bytes(FILES["P with transparency (PNG)"][0])
    result = run_command(cifar_accel_command("predict", "--model", str(saved_model), "--json", "--top_k", "4",
                                             str(sixteen_bit), str(transparent)))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    expected = load_model(saved_model).predict([Image.fromarray(as_rgb(GREY)), Image.fromarray(PALETTE[INDICES])])
    assert [entry["image"] for entry in printed] == [str(sixteen_bit), str(transparent)]
    for entry, ranked in zip(printed, expected, strict=True):
        assert [item["label"] for item in entry["predictions"]] == [item["label"] for item in ranked]
        assert [item["score"] for item in entry["predictions"]] == pytest.approx([item["score"] for item in ranked])


def test_predict_command_refuses_a_bomb_in_one_line(saved_model, tmp_path):
    good, bomb = tmp_path / "good.png", tmp_path / "bomb.png"
    good.write_bytes(FILES["RGBA (PNG)"][0])
    bomb.write_bytes(BOMB)
    result = run_command(cifar_accel_command("predict", "--model", str(saved_model), str(good), str(bomb)))
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: image {bomb} is refused as a possible decompression bomb (Image size (10000000000")
    assert result.stdout == ""  # every file is checked before anything is predicted


def test_predict_command_refuses_an_undecodable_file_in_one_line(saved_model, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(FILES["RGBA (PNG)"][0][:200])
    with pytest.raises(SystemExit) as exit_status:
        predict_main(["--model", str(saved_model), str(broken)])
    assert exit_status.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith(f"error: image {broken} cannot be decoded (")
