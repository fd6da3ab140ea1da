"""Small log-scale charts drawn with numpy and the built-in bitmap font: no matplotlib, a few milliseconds each, and
no caches that grow with the values drawn (matplotlib's text and tick caches add ~25 MB over the first figures)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from lightning_interp.saliency_render import text_image

__all__ = ["gradient_flow_chart"]

_BLUE, _ORANGE, _GRID, _AXIS, _PAPER = (31, 119, 180), (255, 127, 14), (225, 225, 225), (120, 120, 120), 255
_LEFT, _PANEL_H, _TOP = 52, 150, 18


def _decades(values: Sequence[float], include_one: bool = False) -> tuple[int, int] | None:
    logs = [math.log10(v) for v in values if v > 0 and math.isfinite(v)]
    if include_one:
        logs.append(0.0)
    if not logs:
        return None
    low, high = math.floor(min(logs)), math.ceil(max(logs))
    return (low, high) if high > low else (low - 1, high + 1)


def _paste(canvas: np.ndarray, image: np.ndarray, y: int, x: int) -> None:
    h, w = min(image.shape[0], canvas.shape[0] - y), min(image.shape[1], canvas.shape[1] - x)
    if h > 0 and w > 0 and y >= 0 and x >= 0:
        canvas[y : y + h, x : x + w] = image[:h, :w]


def _panel(
    title: str, decades: tuple[int, int] | None, width: int
) -> tuple[np.ndarray, Callable[[float], int]]:
    """A blank panel with its title, decade grid and labels; returns it and the value -> row mapping."""
    panel = np.full((_TOP + _PANEL_H + 4, width, 3), _PAPER, dtype=np.uint8)
    _paste(panel, text_image(title, 2), 2, 4)
    low, high = decades or (0, 1)
    step = max(1, math.ceil((high - low) / 6))  # at most ~6 labelled decades

    def row(value: float) -> int:
        return _TOP + int(round((high - math.log10(value)) / (high - low) * (_PANEL_H - 1)))

    for decade in range(low, high + 1):
        y = row(10.0**decade)
        panel[y, _LEFT:] = _GRID
        if (decade - low) % step == 0:
            label = text_image(f"1e{decade}", 2)
            _paste(panel, label, y - label.shape[0] // 2, _LEFT - label.shape[1] - 4)
    panel[_TOP : _TOP + _PANEL_H, _LEFT - 1] = _AXIS
    return panel, row


def _line(panel: np.ndarray, points: list[tuple[int, int] | None], color: tuple[int, int, int]) -> None:
    for a, b in zip(points, points[1:]):
        if a is None or b is None:
            continue
        n = 2 * max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
        ys = np.round(np.linspace(a[0], b[0], n)).astype(int)
        xs = np.round(np.linspace(a[1], b[1], n)).astype(int)
        panel[ys, xs] = color
        panel[np.minimum(ys + 1, panel.shape[0] - 1), xs] = color
    for point in points:
        if point is not None:
            y, x = point
            panel[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3] = color


def gradient_flow_chart(
    names: Sequence[str], norms: Sequence[float], measured: Sequence[float], analytic: Sequence[float]
) -> np.ndarray:
    """The gradient-flow picture as an ``(H, W, 3)`` uint8 image: per layer (output on the right) a bar of the
    gradient norm on a log scale, and below it the measured and the analytic cumulative products (blue and orange,
    a darker line at 1). Non-finite or non-positive values are left out.

    Example:
        >>> image = gradient_flow_chart(["relu1", "relu2", "output"], [0.01, 0.1, 1.0], [0.5, 1.0, 1.0],
        ...                             [2.0, 1.5, 1.0])
        >>> image.shape[2], image.dtype.name, image.shape[1] >= 360
        (3, 'uint8', True)
        >>> bool((image == (31, 119, 180)).all(axis=2).any())  # blue bars and points are drawn
        True
    """
    count = len(names)
    cell = max(28, 300 // max(count, 1))
    width = _LEFT + cell * max(count, 1) + 8
    centers = [_LEFT + cell * i + cell // 2 for i in range(count)]

    top, row = _panel("gradient norm per layer", _decades(norms), width)
    for x, value in zip(centers, norms):
        if value > 0 and math.isfinite(value):
            top[min(row(value), _TOP + _PANEL_H - 2) : _TOP + _PANEL_H, x - cell // 3 : x + cell // 3] = _BLUE

    bottom, row = _panel("cumulative product: measured (blue), analytic (orange)",
                         _decades([*measured, *analytic], include_one=True), width)  # fmt: skip
    bottom[row(1.0), _LEFT:] = _AXIS
    for series, color in ((analytic, _ORANGE), (measured, _BLUE)):
        points = [(row(v), x) if v > 0 and math.isfinite(v) else None for x, v in zip(centers, series)]
        _line(bottom, points, color)

    labels = [np.rot90(text_image(str(name)[-18:], 2)) for name in names]  # read bottom to top
    band = np.full((max((img.shape[0] for img in labels), default=0) + 6, width, 3), _PAPER, dtype=np.uint8)
    for x, img in zip(centers, labels):
        _paste(band, img, 3, x - img.shape[1] // 2)
    return np.concatenate([top, bottom, band], axis=0)
