"""Small image utilities shared by the examples: procedural images, grids and a PNG writer.

Only the standard library, NumPy and torch: the examples run on a fresh offline machine.
Images are float tensors of shape (3, H, W) with values in [0, 1].
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def write_png(path: str | Path, image: Tensor) -> Path:
    """Write a (3, H, W) or (1, H, W) image in [0, 1] as an 8-bit PNG; return the path."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (3, H, W) or (1, H, W), got {tuple(image.shape)}")
    array = (image.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    if array.shape[0] == 1:
        array = array.expand(3, -1, -1)
    pixels = array.permute(1, 2, 0).contiguous().numpy()
    height, width = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    blob = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    blob += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return path


def grid(images: Sequence[Tensor], columns: int, pad: int = 4) -> Tensor:
    """Tile equally sized (3, H, W) images into one image, row by row, on a white background."""
    if not images:
        raise ValueError("grid needs at least one image")
    height, width = images[0].shape[-2:]
    rows = math.ceil(len(images) / columns)
    canvas = torch.ones(3, rows * (height + pad) + pad, columns * (width + pad) + pad)
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        canvas[:, top : top + height, left : left + width] = image.detach().float().clamp(0, 1)
    return canvas


def _coords(size: int) -> tuple[Tensor, Tensor]:
    axis = torch.linspace(0, 1, size)
    return torch.meshgrid(axis, axis, indexing="ij")


def stripes(
    size: int = 128,
    colors: Sequence[Sequence[float]] | None = None,
    frequency: float = 6.0,
    angle: float = 0.6,
) -> Tensor:
    """Diagonal colour stripes: a simple, strongly stylised texture."""
    colors = colors or [(0.9, 0.3, 0.1), (0.1, 0.2, 0.6)]
    y, x = _coords(size)
    phase = torch.sin(2 * math.pi * frequency * (x * math.cos(angle) + y * math.sin(angle)))
    t = (phase > 0).float()
    a, b = (torch.tensor(c, dtype=torch.float32).view(3, 1, 1) for c in colors[:2])
    return a * t + b * (1 - t)


def dots(
    size: int = 128,
    seed: int = 0,
    count: int = 40,
    palette: Sequence[Sequence[float]] | None = None,
) -> Tensor:
    """Random soft coloured dots on a pale background."""
    palette = palette or [(0.95, 0.8, 0.2), (0.2, 0.6, 0.3), (0.8, 0.1, 0.3)]
    rng = np.random.default_rng(seed)
    y, x = _coords(size)
    image = torch.full((3, size, size), 0.93)
    for _ in range(count):
        cy, cx, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.08)
        color = torch.tensor(palette[int(rng.integers(len(palette)))], dtype=torch.float32)
        weight = torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2))
        image = image * (1 - weight) + color.view(3, 1, 1) * weight
    return image


def marble(size: int = 128, seed: int = 1, tint: Sequence[float] = (0.55, 0.45, 0.75)) -> Tensor:
    """Marble-like veins from a sum of random sinusoids."""
    gen = torch.Generator().manual_seed(seed)
    y, x = _coords(size)
    field = torch.zeros(size, size)
    for octave in range(1, 6):
        fx, fy, ph = (torch.rand(3, generator=gen) * torch.tensor([6.0, 6.0, 6.28])).tolist()
        field += torch.sin(octave * (fx * x + fy * y) * math.pi + ph) / octave
    veins = torch.sin(8 * x * math.pi + 3 * field).abs() ** 0.4
    return torch.tensor(tint).view(3, 1, 1) * veins + 0.15 * (1 - veins)


def scene(size: int = 128) -> Tensor:
    """A simple content image: sky gradient, a sun, hills; clear shapes that survive stylisation."""
    y, x = _coords(size)
    sky = torch.stack([0.45 + 0.3 * y, 0.65 + 0.2 * y, 0.95 - 0.1 * y])
    sun = (((x - 0.72) ** 2 + (y - 0.25) ** 2) < 0.012).float()
    hill = (y > 0.62 + 0.12 * torch.sin(5 * x)).float()
    image = sky * (1 - sun) + torch.tensor([1.0, 0.85, 0.3]).view(3, 1, 1) * sun
    ground = torch.stack([0.25 + 0.2 * x, 0.55 - 0.15 * y, 0.2 + 0 * x])
    return image * (1 - hill) + ground * hill
