"""Turning tensors into pictures without matplotlib: colour maps, scaling and image grids (uint8 HWC numpy)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["colorize", "upscale", "tile", "normalize_unit", "to_rgb"]

# Colour anchors sampled from matplotlib's perceptually uniform "viridis" (van der Walt & Smith), evenly spaced.
_SEQUENTIAL = np.array(
    [
        [68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
        [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37],
    ],
    dtype=np.float64,
)  # fmt: skip
# A blue-white-red diverging map for signed values (negative blue, zero white, positive red).
_DIVERGING = np.array([[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]], dtype=np.float64)


def _apply(anchors: np.ndarray, values: np.ndarray) -> np.ndarray:
    values = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)
    position = values * (len(anchors) - 1)
    low = np.floor(position).astype(int).clip(0, len(anchors) - 2)
    frac = (position - low)[..., None]
    rgb = anchors[low] * (1 - frac) + anchors[low + 1] * frac
    return rgb.round().astype(np.uint8)


def normalize_unit(values: np.ndarray | torch.Tensor, signed: bool = False) -> np.ndarray:
    """Scale to [0, 1]: by the max |value| around 0.5 when ``signed``; else from min(0, min) to max(0, max), so
    that 0 stays at the dark end of a non-negative map.

    Example:
        >>> normalize_unit(np.array([-2.0, 0.0, 1.0]), signed=True).tolist()
        [0.0, 0.5, 0.75]
        >>> [round(v, 3) for v in normalize_unit(np.array([1.0, 3.0])).tolist()]
        [0.333, 1.0]
    """
    array = values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    array = np.nan_to_num(array.astype(np.float64))
    if signed:
        scale = np.abs(array).max()
        return 0.5 + 0.5 * array / scale if scale > 0 else np.full_like(array, 0.5)
    low, high = array.min(initial=0.0), array.max(initial=0.0)
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def colorize(values: np.ndarray | torch.Tensor, signed: bool = False, normalize: bool = True) -> np.ndarray:
    """Map a 2-D array to an ``(H, W, 3)`` uint8 image (viridis, or blue-white-red when ``signed``).

    Example:
        >>> colorize(np.array([[0.0, 1.0]])).shape
        (1, 2, 3)
    """
    unit = normalize_unit(values, signed) if normalize else np.asarray(values, dtype=np.float64)
    return _apply(_DIVERGING if signed else _SEQUENTIAL, unit)


def to_rgb(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """A ``(C, H, W)`` or ``(H, W)`` image (C = 1 or 3) as ``(H, W, 3)`` uint8, scaled by :func:`normalize_unit`.

    Example:
        >>> to_rgb(torch.tensor([[[0.0, 1.0]]])).tolist()
        [[[0, 0, 0], [255, 255, 255]]]
    """
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, float)
    if array.ndim == 3:
        array = array.transpose(1, 2, 0)
        if array.shape[2] == 1:
            array = array[..., 0]
    unit = normalize_unit(array)
    if unit.ndim == 2:
        unit = np.repeat(unit[..., None], 3, axis=2)
    return (unit * 255).round().astype(np.uint8)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer ``factor`` (keeps pixels crisp).

    Example:
        >>> upscale(np.zeros((2, 3, 3), np.uint8), 4).shape
        (8, 12, 3)
    """
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def tile(rows: list[list[np.ndarray]], pad: int = 2, background: int = 255) -> np.ndarray:
    """Arrange equally sized ``(H, W, 3)`` images in a grid with ``pad`` pixels between them.

    Example:
        >>> tile([[np.zeros((4, 4, 3), np.uint8)] * 3] * 2, pad=1).shape
        (9, 14, 3)
    """
    height = max(img.shape[0] for row in rows for img in row)
    width = max(img.shape[1] for row in rows for img in row)
    n_cols = max(len(row) for row in rows)
    canvas = np.full(
        (len(rows) * (height + pad) - pad, n_cols * (width + pad) - pad, 3), background, dtype=np.uint8
    )
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            y, x = r * (height + pad), c * (width + pad)
            canvas[y : y + img.shape[0], x : x + img.shape[1]] = img
    return canvas
