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


def _png_filter_rows(pixels: np.ndarray) -> bytes:
    """Filter each row of (H, W, 3) uint8 pixels with the PNG filter None, Sub or Up that
    compresses best (smallest sum of absolute signed bytes, the usual heuristic).

    Filtering roughly halves the size of smooth images; these three filters (unlike Average
    and Paeth) can be undone with whole-array NumPy operations, which keeps :func:`read_png`
    short and fast.
    """
    height = pixels.shape[0]
    rows = pixels.reshape(height, -1).astype(np.int16)
    left = np.zeros_like(rows)
    left[:, 3:] = rows[:, :-3]
    up = np.zeros_like(rows)
    up[1:] = rows[:-1]
    candidates = np.stack([rows, rows - left, rows - up]).astype(np.uint8)
    cost = np.abs(candidates.astype(np.int8).astype(np.int32)).sum(axis=2)
    best = cost.argmin(axis=0)
    return b"".join(
        bytes([int(kind)]) + candidates[kind, row].tobytes() for row, kind in enumerate(best)
    )


def read_png(path: str | Path) -> Tensor:
    """Read an 8-bit RGB PNG written by :func:`write_png` as a (3, H, W) float image in [0, 1].

    Only what ``write_png`` writes is supported (8-bit RGB, no interlacing, filters None, Sub,
    Up); anything else raises ValueError.
    """
    blob = Path(path).read_bytes()
    if blob[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    offset, header, data = 8, b"", b""
    while offset < len(blob):
        (length,) = struct.unpack(">I", blob[offset : offset + 4])
        kind, body = blob[offset + 4 : offset + 8], blob[offset + 8 : offset + 8 + length]
        if zlib.crc32(kind + body) != struct.unpack(">I", blob[offset + 8 + length :][:4])[0]:
            raise ValueError(f"{path}: corrupt {kind.decode(errors='replace')} chunk")
        header = body if kind == b"IHDR" else header
        data += body if kind == b"IDAT" else b""
        offset += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if (depth, color, interlace) != (8, 2, 0):
        raise ValueError(f"{path}: only 8-bit RGB, non-interlaced PNGs are supported")
    raw = np.frombuffer(zlib.decompress(data), dtype=np.uint8).reshape(height, 1 + 3 * width)
    kinds, rows = raw[:, 0], raw[:, 1:].astype(np.int64)
    if kinds.max(initial=0) > 2:
        raise ValueError(f"{path}: uses PNG filters this reader does not undo")
    sub = kinds == 1
    # Sub: a running sum along each colour channel of the row.
    rows[sub] = rows[sub].reshape(-1, width, 3).cumsum(axis=1).reshape(-1, 3 * width)
    rows %= 256
    for row in np.flatnonzero(kinds == 2):  # Up: add the decoded row above
        rows[row] = (rows[row] + (rows[row - 1] if row else 0)) % 256
    pixels = torch.from_numpy(rows.reshape(height, width, 3).astype(np.float32) / 255)
    return pixels.permute(2, 0, 1).contiguous()


def write_png(path: str | Path, image: Tensor, bits: int = 8) -> Path:
    """Write a (3, H, W) or (1, H, W) image in [0, 1] as an 8-bit PNG; return the path.

    ``bits < 8`` rounds every value to ``2**bits`` levels first: the file stays an ordinary
    8-bit PNG but compresses much better (6 bits look the same and take about half the bytes).
    """
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (3, H, W) or (1, H, W), got {tuple(image.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")
    levels = 2**bits - 1
    image = torch.round(image.detach().float().clamp(0, 1) * levels) / levels
    array = (image * 255 + 0.5).to(torch.uint8)
    if array.shape[0] == 1:
        array = array.expand(3, -1, -1)
    pixels = array.permute(1, 2, 0).contiguous().numpy()
    height, width = pixels.shape[:2]
    raw = _png_filter_rows(pixels)

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


def read_png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from a PNG's header; raises ValueError if the file is not a PNG."""
    head = Path(path).read_bytes()[:24]
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


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


def shapes(size: int = 128, seed: int = 0, count: int = 6) -> Tensor:
    """A random content image: a two-colour gradient with soft-edged discs and boxes on it.

    Different seeds give different images: a cheap stand-in for a photo data set when training
    a stylisation network.
    """
    rng = np.random.default_rng(seed)
    y, x = _coords(size)
    top, bottom = (torch.tensor(rng.uniform(0.1, 0.95, 3), dtype=torch.float32) for _ in "ab")
    image = top.view(3, 1, 1) * (1 - y) + bottom.view(3, 1, 1) * y
    sharpness = 1.5 * size  # edges about two pixels wide
    for _ in range(count):
        color = torch.tensor(rng.uniform(0.0, 1.0, 3), dtype=torch.float32).view(3, 1, 1)
        cy, cx, radius = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.25)
        if rng.uniform() < 0.5:
            distance = ((x - cx) ** 2 + (y - cy) ** 2).sqrt() - radius
        else:
            distance = torch.maximum((x - cx).abs(), (y - cy).abs()) - radius
        weight = torch.sigmoid(-distance * sharpness)
        image = image * (1 - weight) + color * weight
    return image


def waves(
    size: int = 128,
    colors: Sequence[Sequence[float]] | None = None,
    frequency: float = 5.0,
) -> Tensor:
    """Wavy concentric bands in two colours: a texture unlike stripes, dots and marble."""
    colors = colors or [(0.1, 0.45, 0.45), (0.95, 0.85, 0.6)]
    y, x = _coords(size)
    radius = ((x - 0.3) ** 2 + (y - 0.4) ** 2).sqrt()
    phase = torch.sin(2 * math.pi * frequency * radius + 1.5 * torch.sin(6 * math.pi * x))
    t = torch.sigmoid(4 * phase)
    a, b = (torch.tensor(c, dtype=torch.float32).view(3, 1, 1) for c in colors[:2])
    return a * t + b * (1 - t)


def resize(image: Tensor, height: int, width: int | None = None) -> Tensor:
    """Resize a (3, H, W) image: nearest for whole-number enlargement (crisp pixels), else area
    (shrinking) or bilinear (enlarging)."""
    width = width if width is not None else round(image.shape[-1] * height / image.shape[-2])
    h, w = image.shape[-2:]
    if height % h == 0 and width % w == 0 and height // h == width // w:
        mode = "nearest"
    else:
        mode = "area" if height < h else "bilinear"
    out = torch.nn.functional.interpolate(image[None].float(), size=(height, width), mode=mode)
    return out[0].clamp(0, 1)


def stack(images: Sequence[Tensor], horizontal: bool = False, pad: int = 0) -> Tensor:
    """Stack (3, H, W) images below each other (or side by side), padding the shorter side with
    white and putting ``pad`` white pixels between them."""
    axis = -1 if horizontal else -2
    other = -2 if horizontal else -1
    extent = max(image.shape[other] for image in images)
    parts: list[Tensor] = []
    for k, image in enumerate(images):
        missing = extent - image.shape[other]
        if missing:
            filler_shape = list(image.shape)
            filler_shape[other] = missing
            image = torch.cat([image, torch.ones(filler_shape)], dim=other)
        if k and pad:
            gap_shape = list(image.shape)
            gap_shape[axis] = pad
            parts.append(torch.ones(gap_shape))
        parts.append(image.float())
    return torch.cat(parts, dim=axis)


# A 3x5 pixel font, enough for short labels: each glyph is five rows of three pixels.
_FONT_ROWS = {
    "A": ".#.|#.#|###|#.#|#.#", "B": "##.|#.#|##.|#.#|##.", "C": ".##|#..|#..|#..|.##",
    "D": "##.|#.#|#.#|#.#|##.", "E": "###|#..|##.|#..|###", "F": "###|#..|##.|#..|#..",
    "G": ".##|#..|#.#|#.#|.##", "H": "#.#|#.#|###|#.#|#.#", "I": "###|.#.|.#.|.#.|###",
    "J": "..#|..#|..#|#.#|.#.", "K": "#.#|#.#|##.|#.#|#.#", "L": "#..|#..|#..|#..|###",
    "M": "#.#|###|###|#.#|#.#", "N": "##.|#.#|#.#|#.#|#.#", "O": ".#.|#.#|#.#|#.#|.#.",
    "P": "##.|#.#|##.|#..|#..", "Q": ".#.|#.#|#.#|##.|.##", "R": "##.|#.#|##.|#.#|#.#",
    "S": ".##|#..|.#.|..#|##.", "T": "###|.#.|.#.|.#.|.#.", "U": "#.#|#.#|#.#|#.#|###",
    "V": "#.#|#.#|#.#|#.#|.#.", "W": "#.#|#.#|###|###|#.#", "X": "#.#|#.#|.#.|#.#|#.#",
    "Y": "#.#|#.#|.#.|.#.|.#.", "Z": "###|..#|.#.|#..|###", "0": "###|#.#|#.#|#.#|###",
    "1": ".#.|##.|.#.|.#.|###", "2": "##.|..#|.#.|#..|###", "3": "##.|..#|.#.|..#|##.",
    "4": "#.#|#.#|###|..#|..#", "5": "###|#..|##.|..#|##.", "6": ".##|#..|###|#.#|###",
    "7": "###|..#|.#.|.#.|.#.", "8": "###|#.#|###|#.#|###", "9": "###|#.#|###|..#|##.",
    ".": "...|...|...|...|.#.", ",": "...|...|...|.#.|#..", "-": "...|...|###|...|...",
    "+": "...|.#.|###|.#.|...", "=": "...|###|...|###|...", "/": "..#|..#|.#.|#..|#..",
    ":": "...|.#.|...|.#.|...", "(": ".#.|#..|#..|#..|.#.", ")": ".#.|..#|..#|..#|.#.",
    "<": "..#|.#.|#..|.#.|..#", ">": "#..|.#.|..#|.#.|#..", "%": "#.#|..#|.#.|#..|#.#",
    "'": ".#.|.#.|...|...|...", "*": "...|#.#|.#.|#.#|...", "_": "...|...|...|...|###",
    " ": "...|...|...|...|...",
}  # fmt: skip
_FONT = {
    char: torch.tensor([[c == "#" for c in row] for row in rows.split("|")], dtype=torch.float32)
    for char, rows in _FONT_ROWS.items()
}


def text(
    message: str, scale: int = 2, color: Sequence[float] = (0.1, 0.1, 0.1), background: float = 1.0
) -> Tensor:
    """Render ``message`` (upper-cased; unknown characters become spaces) as a (3, 5s, W) image."""
    glyphs = [_FONT.get(char, _FONT[" "]) for char in message.upper()]
    spaced: list[Tensor] = []
    for k, glyph in enumerate(glyphs):
        if k:
            spaced.append(torch.zeros(5, 1))
        spaced.append(glyph)
    ink = torch.cat(spaced, dim=1) if spaced else torch.zeros(5, 1)
    ink = ink.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    ink_color = torch.tensor(color, dtype=torch.float32).view(3, 1, 1)
    return background * (1 - ink) + ink_color * ink


def labelled(image: Tensor, label: str, scale: int = 2, above: bool = True) -> Tensor:
    """``image`` with a centred text label in a white strip above (or below) it."""
    caption = text(label, scale)
    if caption.shape[-1] > image.shape[-1]:  # too long for the tile: shrink to 1x, then cut
        caption = text(label, 1)[..., : image.shape[-1]]
    strip = torch.ones(3, 7 * scale + 2, image.shape[-1])  # same height for every caption
    left = (image.shape[-1] - caption.shape[-1]) // 2
    top = (strip.shape[-2] - caption.shape[-2]) // 2
    strip[:, top : top + caption.shape[-2], left : left + caption.shape[-1]] = caption
    return stack([strip, image] if above else [image, strip])


def labelled_grid(
    images: Sequence[Tensor],
    columns: int,
    labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    pad: int = 4,
    scale: int = 2,
) -> Tensor:
    """:func:`grid` with a label above every tile, optional row labels on the left and a title."""
    tiles = list(images)
    if labels is not None:
        tiles = [labelled(tile, label, scale) for tile, label in zip(tiles, labels, strict=True)]
    canvas = grid(tiles, columns, pad)
    if row_labels is not None:
        rows = math.ceil(len(tiles) / columns)
        height = tiles[0].shape[-2]
        captions = [text(label, scale) for label in row_labels]
        width = max(c.shape[-1] for c in captions) + 2 * pad
        margin = torch.ones(3, canvas.shape[-2], width)
        for r, caption in zip(range(rows), captions, strict=False):
            top = pad + r * (height + pad) + (height - caption.shape[-2]) // 2
            margin[:, top : top + caption.shape[-2], pad : pad + caption.shape[-1]] = caption
        canvas = stack([margin, canvas], horizontal=True)
    if title is not None:
        canvas = labelled(canvas, title, scale + 1)
    return canvas


# Colours of the curves of line_plot, in order (colour-blind friendly, after Okabe & Ito).
PLOT_COLORS = [
    (0.0, 0.45, 0.70),
    (0.84, 0.37, 0.0),
    (0.0, 0.62, 0.45),
    (0.8, 0.47, 0.65),
    (0.9, 0.62, 0.0),
    (0.34, 0.71, 0.91),
]


def _draw_polyline(canvas: Tensor, xs: Tensor, ys: Tensor, color: Tensor, width: int) -> None:
    """Draw a polyline through pixel coordinates (xs, ys) into ``canvas`` (3, H, W), in place."""
    height, canvas_width = canvas.shape[-2:]
    points_x, points_y = [], []
    for k in range(len(xs) - 1):
        length = float(max((xs[k + 1] - xs[k]).abs(), (ys[k + 1] - ys[k]).abs()))
        t = torch.linspace(0, 1, max(2, int(length * 2) + 1))
        points_x.append(xs[k] + t * (xs[k + 1] - xs[k]))
        points_y.append(ys[k] + t * (ys[k + 1] - ys[k]))
    if not points_x:
        points_x, points_y = [xs], [ys]
    px, py = torch.cat(points_x), torch.cat(points_y)
    half = width // 2
    for dy in range(-half, width - half):
        for dx in range(-half, width - half):
            col = (px.round().long() + dx).clamp(0, canvas_width - 1)
            row = (py.round().long() + dy).clamp(0, height - 1)
            canvas[:, row, col] = color.view(3, 1)


def _format_number(value: float) -> str:
    """A short label for an axis tick: 3 significant digits, E notation for tiny/huge values."""
    if value == 0:
        return "0"
    if 1e-2 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")


def line_plot(
    curves: dict[str, Sequence[float]],
    width: int = 480,
    height: int = 300,
    log_y: bool = True,
    title: str | None = None,
    x_label: str = "step",
    y_label: str = "loss",
) -> Tensor:
    """Rasterise loss curves into a (3, H, W) image: axes, min/max ticks, a legend, log y-axis.

    Only torch: no plotting library needed. Non-positive values on a log axis are clipped.
    """
    scale = 2
    values = {name: torch.tensor(list(v), dtype=torch.float64) for name, v in curves.items()}
    values = {name: v for name, v in values.items() if len(v)}
    if not values:
        raise ValueError("line_plot needs at least one non-empty curve")
    every = torch.cat(list(values.values()))
    every = every[torch.isfinite(every)]
    if log_y:
        every = every[every > 0]
    low, high = (float(every.min()), float(every.max())) if len(every) else (1.0, 1.0)

    def transform(v: Tensor | float) -> Tensor:
        v = torch.as_tensor(v, dtype=torch.float64)
        return v.clamp_min(low).log10() if log_y else v

    y_low, y_high = float(transform(low)), float(transform(high))
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    steps = max(len(v) for v in values.values())
    high_label, low_label = _format_number(high), _format_number(low)
    margin_left = 5 * scale + 4 * scale * max(len(high_label), len(low_label)) + 8
    margin_bottom, margin_top, margin_right = 5 * scale * 2 + 10, 8, 10
    canvas = torch.ones(3, height, width)
    plot_w, plot_h = width - margin_left - margin_right, height - margin_top - margin_bottom
    left, top, bottom = margin_left, margin_top, margin_top + plot_h
    grey = torch.tensor([0.85, 0.85, 0.85])
    for frac in (0.25, 0.5, 0.75):  # light grid lines
        canvas[:, int(top + frac * plot_h), left : left + plot_w] = grey.view(3, 1)
        canvas[:, top:bottom, int(left + frac * plot_w)] = grey.view(3, 1)
    canvas[:, top : bottom + 1, left] = 0.2  # axes
    canvas[:, bottom, left : left + plot_w] = 0.2
    for k, (_name, v) in enumerate(values.items()):
        color = torch.tensor(PLOT_COLORS[k % len(PLOT_COLORS)])
        finite = torch.isfinite(v)
        xs = torch.arange(len(v), dtype=torch.float64)[finite]
        xs = left + 1 + xs / max(steps - 1, 1) * (plot_w - 2)
        ys = bottom - 1 - (transform(v[finite]) - y_low) / (y_high - y_low) * (plot_h - 2)
        if len(xs):
            _draw_polyline(canvas, xs.float(), ys.float(), color, width=2)

    def paste(image: Tensor, row: int, col: int) -> None:
        h, w = image.shape[-2:]
        row, col = max(0, min(row, height - h)), max(0, min(col, width - w))
        canvas[:, row : row + h, col : col + w] = image

    paste(text(high_label, scale), top, 2 * scale + 4)
    paste(text(low_label, scale), bottom - 5 * scale, 2 * scale + 4)
    paste(text("0", scale), bottom + 4, left - scale)
    paste(text(str(steps - 1), scale), bottom + 4, left + plot_w - 4 * scale * len(str(steps - 1)))
    axis_name = text(f"{x_label}", scale)
    paste(axis_name, bottom + 4, left + (plot_w - axis_name.shape[-1]) // 2)
    y_name = text(f"{y_label} (log)" if log_y else y_label, scale)
    paste(y_name.transpose(-1, -2).flip(-2), top + (plot_h - y_name.shape[-1]) // 2, 2)
    # Legend: a colour swatch and the curve's name per line, in the upper right corner.
    row = top + 6
    for k, name in enumerate(values):
        swatch = torch.ones(3, 5 * scale, 6 * scale) * torch.tensor(
            PLOT_COLORS[k % len(PLOT_COLORS)]
        ).view(3, 1, 1)
        entry = stack([swatch, torch.ones(3, 5 * scale, 4), text(name, scale)], horizontal=True)
        paste(entry, row, left + plot_w - entry.shape[-1] - 6)
        row += 5 * scale + 4
    rows_below = [canvas] if title is None else [text(title, scale + 1), canvas]
    return stack(rows_below, pad=4) if title is not None else canvas
