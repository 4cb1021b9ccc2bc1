"""Headless-Chromium screenshots of HTML reports, and a stdlib PNG reader to check them.

The tests use this to prove that ``report.html`` renders its charts in a real
browser without network access.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from collections import Counter
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")


class NoChromium(RuntimeError):
    """No Chromium binary on PATH."""


def chromium() -> str:
    """Path of the Chromium binary; raises ``NoChromium`` saying how to install it."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise NoChromium("chromium is not on PATH; the HTML report check needs it "
                     "(Debian: apt-get install -y chromium)")


def screenshot(html: Path, png: Path, profile: Path, size: str = "1280,2000") -> None:
    """Open ``html`` in headless Chromium and write a screenshot to ``png``."""
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
           f"--window-size={size}", html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, timeout=90, check=False)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}):\n"
                           + proc.stderr.decode(errors="replace")[-2000:])


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG into ``(width, height, rows of RGB bytes)``."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    pos = 8
    idat = b""
    width = height = bpp = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            if depth != 8 or color not in (2, 6) or interlace != 0:
                raise ValueError(f"{path}: only 8-bit RGB/RGBA non-interlaced PNGs are read")
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        elif kind == b"IEND":
            break
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + ((a + b) >> 1)) & 0xFF
            elif ftype == 4:
                line[i] = (line[i] + _paeth(a, b, c)) & 0xFF
        prev = line
        if bpp == 4:
            rgb = bytearray()
            for i in range(0, stride, 4):
                rgb += line[i:i + 3]
            rows.append(bytes(rgb))
        else:
            rows.append(bytes(line))
    return width, height, rows


def color_counts(rows: list[bytes], step: int = 2) -> Counter[tuple[int, int, int]]:
    """Counts of RGB colors over every ``step``-th pixel of every ``step``-th row."""
    counts: Counter[tuple[int, int, int]] = Counter()
    for row in rows[::step]:
        for i in range(0, len(row), 3 * step):
            counts[(row[i], row[i + 1], row[i + 2])] += 1
    return counts


def near(counts: Counter[tuple[int, int, int]], rgb: tuple[int, int, int],
         tol: int = 12) -> int:
    """Pixels whose color is within ``tol`` of ``rgb`` on every channel."""
    return sum(n for c, n in counts.items() if all(abs(c[i] - rgb[i]) <= tol for i in range(3)))


def hex_rgb(color: str) -> tuple[int, int, int]:
    """``#rrggbb`` to a tuple."""
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)
