"""A generated corpus of good images in every awkward format, and bad files of every kind, with expectations."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def make_corpus(folder: Path, seed: int = 0) -> tuple[list[str], dict[str, str]]:
    """Write the corpus into ``folder``.

    Returns:
        the good image paths, and bad path -> a word its failure reason must contain.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def rgb(h: int, w: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    good = {
        "rgb.jpg": lambda p: Image.fromarray(rgb(40, 60)).save(p, quality=90),
        "rgba.png": lambda p: Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), "RGBA").save(p),
        "grey.png": lambda p: Image.fromarray(rgb(25, 35)[..., 0]).save(p),
        "onebit.png": lambda p: Image.fromarray(rgb(20, 20)[..., 0] > 127).save(p),
        "cmyk.jpg": lambda p: Image.fromarray(rgb(30, 20)).convert("CMYK").save(p),
        "palette.gif": lambda p: Image.fromarray(rgb(16, 48)).convert("P").save(p, transparency=0),
        "sixteen.png": lambda p: Image.fromarray((rng.random((30, 40)) * 65535).astype(np.uint16)).save(p),
        "float.tiff": lambda p: Image.fromarray((rng.random((20, 30)) * 7 - 2).astype(np.float32)).save(p),
        "tall.webp": lambda p: Image.fromarray(rgb(120, 20)).save(p),
        "nested/deep/wide.bmp": lambda p: Image.fromarray(rgb(10, 90)).save(p),
    }
    for name, write in good.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        write(folder / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    Image.fromarray(rgb(20, 50)).save(folder / "rotated.jpg", exif=exif)

    bad = {
        "text.jpg": "not an image",
        "empty.png": "empty",
        "truncated.jpg": "cannot read",
        "zero_size.png": "not an image",
        "bomb.png": "decompression bomb",
        "folder.png": "directory",
    }
    (folder / "text.jpg").write_text("this is not a picture\n")
    (folder / "empty.png").write_bytes(b"")
    jpeg = folder / ".whole.jpg"
    Image.fromarray(rgb(64, 64)).save(jpeg, quality=95)
    (folder / "truncated.jpg").write_bytes(jpeg.read_bytes()[:400])
    jpeg.unlink()
    (folder / "zero_size.png").write_bytes(_png_header_only(0, 0))
    Image.new("L", (400, 400)).save(folder / "bomb.png")  # over the tests' --max-pixels 100000
    (folder / "folder.png").mkdir()
    good_paths = sorted(str(folder / n) for n in [*good, "rotated.jpg"])
    return good_paths, {str(folder / name): word for name, word in bad.items()}
