"""Pictures of attributions without matplotlib: image grids (input | heatmap | overlay), tabular heatmaps with a
bar chart of mean |attribution| per feature, per-position strips for sequences, and a tiny bitmap font for labels.

All functions return ``(H, W, 3)`` uint8 numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lightning_interp.render import colorize, tile, to_rgb, upscale

__all__ = ["text_image", "input_kind", "image_grid", "tabular_chart", "sequence_strip", "token_strip", "robust_unit"]

# A 3x5 pixel font: each glyph is five rows of three pixels ("#" on). Lower-case is drawn as upper-case.
_GLYPHS = {
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###", "3": "### ..# .## ..# ###",
    "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###", "6": "### #.. ### #.# ###", "7": "### ..# ..# .#. .#.",
    "8": "### #.# ### #.# ###", "9": "### #.# ### ..# ###", "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.",
    "C": ".## #.. #.. #.. .##", "D": "##. #.# #.# #.# ##.", "E": "### #.. ##. #.. ###", "F": "### #.. ##. #.. #..",
    "G": ".## #.. #.# #.# .##", "H": "#.# #.# ### #.# #.#", "I": "### .#. .#. .#. ###", "J": "..# ..# ..# #.# .#.",
    "K": "#.# #.# ##. #.# #.#", "L": "#.. #.. #.. #.. ###", "M": "#.# ### ### #.# #.#", "N": "##. #.# #.# #.# #.#",
    "O": ".#. #.# #.# #.# .#.", "P": "##. #.# ##. #.. #..", "Q": ".#. #.# #.# ##. .##", "R": "##. #.# ##. #.# #.#",
    "S": ".## #.. .#. ..# ##.", "T": "### .#. .#. .#. .#.", "U": "#.# #.# #.# #.# ###", "V": "#.# #.# #.# #.# .#.",
    "W": "#.# #.# ### ### #.#", "X": "#.# #.# .#. #.# #.#", "Y": "#.# #.# .#. .#. .#.", "Z": "### ..# .#. #.. ###",
    " ": "... ... ... ... ...", ".": "... ... ... ... .#.", ":": "... .#. ... .#. ...", "-": "... ... ### ... ...",
    "(": ".#. #.. #.. #.. .#.", ")": ".#. ..# ..# ..# .#.", "=": "... ### ... ### ...", "/": "..# ..# .#. #.. #..",
    "_": "... ... ... ... ###", "%": "#.# ..# .#. #.. #.#", "|": ".#. .#. .#. .#. .#.", "?": "### ..# .#. ... .#.",
    "+": "... .#. ### .#. ...", ",": "... ... ... .#. #..", "'": ".#. .#. ... ... ...", "<": "..# .#. #.. .#. ..#",
    ">": "#.. .#. ..# .#. #..", "#": "#.# ### #.# ### #.#", "[": "##. #.. #.. #.. ##.", "]": ".## ..# ..# ..# .##",
    "!": ".#. .#. .#. ... .#.", "*": "#.# .#. #.# ... ...", "&": ".#. #.# .#. #.# .##", "@": "### #.# #.# #.. ###",
    '"': "#.# #.# ... ... ...", ";": "... .#. ... .#. #..", "$": ".## ##. .#. .## ##.",
}  # fmt: skip
_FONT = {
    ch: np.array([[c == "#" for c in row] for row in rows.split()], dtype=bool) for ch, rows in _GLYPHS.items()
}
_INK, _PAPER = 30, 255
_SIGNED_METHODS_NOTE = "blue = negative, red = positive; unsigned maps dark (0) to yellow (max)"


def text_image(text: str, scale: int = 2, ink: int = _INK, paper: int = _PAPER) -> np.ndarray:
    """``text`` in the built-in 3x5 font (upper-case; unknown characters as ``?``), ``scale`` pixels per dot.

    Example:
        >>> text_image("pred 3 (0.97)", scale=1).shape
        (5, 51, 3)
    """
    text = text.upper() or " "
    canvas = np.zeros((5, 4 * len(text) - 1), dtype=bool)
    for i, ch in enumerate(text):
        canvas[:, 4 * i : 4 * i + 3] = _FONT.get(ch, _FONT["?"])
    image = np.where(canvas, ink, paper).astype(np.uint8)
    return upscale(np.repeat(image[..., None], 3, axis=2), scale)


def _pad_to(image: np.ndarray, height: int, width: int, paper: int = _PAPER) -> np.ndarray:
    out = np.full((height, width, 3), paper, dtype=np.uint8)
    h, w = min(height, image.shape[0]), min(width, image.shape[1])
    out[:h, :w] = image[:h, :w]
    return out


def _text_block(lines: Sequence[str], scale: int, width: int | None = None, height: int | None = None) -> np.ndarray:
    rendered = [text_image(line, scale) for line in lines]
    gap = scale * 2
    w = max(img.shape[1] for img in rendered)
    block = np.full((sum(img.shape[0] + gap for img in rendered), w, 3), _PAPER, dtype=np.uint8)
    y = 0
    for img in rendered:
        block[y : y + img.shape[0], : img.shape[1]] = img
        y += img.shape[0] + gap
    return _pad_to(block, height or block.shape[0], width or block.shape[1])


def input_kind(shape: Sequence[int]) -> str | None:
    """How a batch of this shape is drawn: ``image`` (B, 1|3, H, W), ``tabular`` (B, F), ``sequence`` (B, T, D);
    ``None`` when it cannot be drawn.

    Example:
        >>> input_kind((8, 1, 8, 8)), input_kind((8, 20)), input_kind((8, 12, 16)), input_kind((8, 5, 8, 8))
        ('image', 'tabular', 'sequence', None)
    """
    if len(shape) == 4 and shape[1] in (1, 3) and shape[2] > 0 and shape[3] > 0:
        return "image"
    if len(shape) == 2 and shape[1] > 0:
        return "tabular"
    if len(shape) == 3 and shape[1] > 0 and shape[2] > 0:
        return "sequence"
    return None


def robust_unit(values: np.ndarray, signed: bool, percentile: float = 99.0) -> np.ndarray:
    """Scale to [0, 1] by the ``percentile`` of |values| (outliers clipped): 0.5 = zero when ``signed``.

    Example:
        >>> robust_unit(np.array([-2.0, 0.0, 1.0, 2.0]), signed=True, percentile=100).tolist()
        [0.0, 0.5, 0.75, 1.0]
        >>> spike = np.array([0.0, 1.0, 2.0, 3.0, 100.0])
        >>> robust_unit(spike, signed=False, percentile=100).round(2).tolist()  # one outlier darkens the rest
        [0.0, 0.01, 0.02, 0.03, 1.0]
        >>> robust_unit(spike, signed=False, percentile=50).tolist()  # scaled by the median, outlier clipped
        [0.0, 0.5, 1.0, 1.0, 1.0]
        >>> robust_unit(np.zeros(3), signed=True).tolist()
        [0.5, 0.5, 0.5]
    """
    values = np.nan_to_num(np.asarray(values, dtype=np.float64))
    scale = np.percentile(np.abs(values), percentile) if values.size else 0.0
    if scale <= 0:
        scale = np.abs(values).max(initial=0.0)
    if scale <= 0:
        return np.full_like(values, 0.5 if signed else 0.0)
    unit = np.clip(values / scale, -1.0, 1.0)
    return 0.5 + 0.5 * unit if signed else np.clip(unit, 0.0, 1.0)


def _caption_lines(caption: str | Sequence[str]) -> list[str]:
    return [caption] if isinstance(caption, str) else list(caption)


def image_grid(
    inputs: torch.Tensor,
    attributions: torch.Tensor,
    signed: bool,
    captions: Sequence[str | Sequence[str]] | None = None,
    min_size: int = 64,
) -> np.ndarray:
    """Rows = examples; columns = caption, input, heatmap (channels summed; per-example scale) and overlay.

    Example:
        >>> image_grid(torch.rand(2, 1, 8, 8), torch.randn(2, 1, 8, 8), signed=True, captions=["A", "B"]).shape
        (146, 262, 3)
    """
    height, width = inputs.shape[2], inputs.shape[3]
    factor = max(1, -(-min_size // max(height, width)))
    scale = 2 if height * factor >= 40 else 1
    cell_h, cell_w = height * factor, width * factor
    attr = attributions.detach().float().cpu().sum(1).numpy()
    rows = []
    header = ["", "input", "heatmap", "overlay"]
    caption_w = max(
        [text_image(line, scale).shape[1] for c in (captions or []) for line in _caption_lines(c)] + [cell_w // 2]
    )
    titles = [_text_block([header[0]], scale, caption_w)] + [_text_block([h], scale, cell_w) for h in header[1:]]
    for i in range(inputs.shape[0]):
        picture = upscale(to_rgb(inputs[i]), factor).astype(np.float64)
        unit = robust_unit(attr[i], signed)
        heat = upscale(colorize(unit, signed=signed, normalize=False), factor)
        strength = upscale((np.abs(unit - 0.5) * 2 if signed else unit)[..., None], factor)
        overlay = (picture * (1 - 0.7 * strength) + heat * 0.7 * strength).round().astype(np.uint8)
        caption = _text_block(_caption_lines(captions[i]) if captions else [""], scale, caption_w, cell_h)
        rows.append([caption, picture.astype(np.uint8), heat, overlay])
    body = tile(rows, pad=2)
    # tile() makes every cell as large as the largest, so the short title row is tiled on its own
    top = _pad_to(tile([titles], pad=2), titles[1].shape[0] + 2, body.shape[1])
    return np.concatenate([top, body], axis=0)


def tabular_chart(
    attributions: torch.Tensor,
    signed: bool,
    captions: Sequence[str] | None = None,
    feature_names: Sequence[str] | None = None,
    max_width: int = 1200,
) -> np.ndarray:
    """A heatmap of examples x features (feature names above the columns when they fit) over a bar chart of the
    mean |attribution| per feature.

    Example:
        >>> tabular_chart(torch.randn(3, 5), signed=True, feature_names=list("abcde")).shape[2]
        3
    """
    attr = attributions.detach().float().cpu().numpy()
    n_rows, n_features = attr.shape
    cell_w = max(1, min(14, max_width // n_features))
    cell_h = 14
    unit = robust_unit(attr, signed)
    heat = colorize(unit, signed=signed, normalize=False).repeat(cell_h, axis=0).repeat(cell_w, axis=1)
    caption_lines = list(captions) if captions else [""] * n_rows
    caption_w = max(text_image(c, 2).shape[1] for c in caption_lines) + 4
    left = np.full((n_rows * cell_h, caption_w, 3), _PAPER, dtype=np.uint8)
    for i, caption in enumerate(caption_lines):
        img = text_image(caption, 2)
        left[i * cell_h + 2 : i * cell_h + 2 + img.shape[0], : img.shape[1]] = img
    body = np.concatenate([left, heat], axis=1)
    parts = []
    if feature_names is not None and cell_w >= 12:
        names = [str(n)[:12] for n in feature_names]
        band_h = max(text_image(n, 2).shape[1] for n in names) + 4
        band = np.full((band_h, body.shape[1], 3), _PAPER, dtype=np.uint8)
        for j, name in enumerate(names):
            img = np.rot90(text_image(name, 2))  # reads bottom to top
            x = caption_w + j * cell_w + (cell_w - img.shape[1]) // 2
            band[band_h - img.shape[0] :, x : x + img.shape[1]] = img
        parts.append(band)
    parts.append(body)
    # bar chart: mean |attribution| per feature, tallest bar = 60 px
    means = np.abs(attr).mean(0)
    bar_h = 60
    top = means.max(initial=0.0)
    heights = np.zeros(n_features, dtype=int) if top <= 0 else np.round(means / top * bar_h).astype(int)
    bars = np.full((bar_h + 14, body.shape[1], 3), _PAPER, dtype=np.uint8)
    for j, h in enumerate(heights):
        x = caption_w + j * cell_w
        bars[4 + bar_h - h : 4 + bar_h, x : x + max(1, cell_w - 1)] = (90, 90, 90)
    label = text_image("mean |attr|", 2)
    bars[4 : 4 + label.shape[0], : min(label.shape[1], caption_w)] = label[:, :caption_w]
    parts.append(bars)
    return np.concatenate(parts, axis=0)


def sequence_strip(
    attributions: torch.Tensor, signed: bool, captions: Sequence[str] | None = None, max_width: int = 1200
) -> np.ndarray:
    """Per-position attribution (summed over the embedding dimension) of ``(B, T, D)`` inputs: one strip per
    example, one cell per position.

    Example:
        >>> sequence_strip(torch.randn(2, 10, 4), signed=True).shape[2]
        3
    """
    per_position = attributions.detach().float().cpu().sum(2)
    return tabular_chart(per_position, signed, captions, None, max_width)


_TOKEN_CHARS = 12  # longer tokens are cut, so that one long word-piece does not take a whole line


def _token_cell(text: str, colour: np.ndarray, scale: int) -> np.ndarray:
    """A token's text on its colour, in white ink on dark colours and dark ink on light ones."""
    glyphs = text_image(text, scale, ink=0, paper=255)[..., 0] == 0
    pad = scale + 1
    cell = np.empty((glyphs.shape[0] + 2 * pad, glyphs.shape[1] + 2 * pad, 3), dtype=np.uint8)
    cell[:] = colour
    luminance = 0.299 * float(colour[0]) + 0.587 * float(colour[1]) + 0.114 * float(colour[2])
    ink = 255 if luminance < 140 else _INK
    cell[pad : pad + glyphs.shape[0], pad : pad + glyphs.shape[1]][glyphs] = ink
    return cell


def token_strip(
    tokens: Sequence[Sequence[str]],
    attributions: Sequence[torch.Tensor | np.ndarray],
    signed: bool,
    captions: Sequence[str | Sequence[str]] | None = None,
    max_width: int = 900,
    scale: int = 2,
) -> np.ndarray:
    """One block per example: its caption lines, then its tokens in reading order, each a cell coloured by its
    attribution (scaled per example to its 99th percentile of |score|; signed: blue = negative, white = 0,
    red = positive; unsigned: dark = 0 to yellow = max), lines wrapped at ``max_width`` pixels. ``tokens[i]`` are
    the texts of example ``i``'s tokens (ids as strings, or word pieces), ``attributions[i]`` their scores.

    Example:
        >>> picture = token_strip([["the", "cat", "sat"], ["a", "dog"]],
        ...                       [torch.tensor([0.1, 2.0, -0.5]), torch.tensor([1.0, 0.0])], signed=True,
        ...                       captions=[["label 1", "pred 1 (0.90)"], ["label 0", "pred 1 (0.55)"]])
        >>> picture.shape[2], picture.dtype.name
        (3, 'uint8')
    """
    legend = "blue = negative, red = positive" if signed else "dark = 0, yellow = max |attribution|"
    blocks = [_text_block([legend], scale)]
    gap = scale * 2
    for i, (texts, scores) in enumerate(zip(tokens, attributions)):
        values = scores.detach().float().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
        values = values.reshape(-1).astype(np.float64)
        colours = colorize(robust_unit(values, signed)[None, :], signed=signed, normalize=False)[0]
        cells = [_token_cell(str(text)[:_TOKEN_CHARS] or " ", colours[j], scale) for j, text in enumerate(texts)]
        if not cells:
            cells = [text_image("(no tokens)", scale)]
        lines: list[list[np.ndarray]] = [[]]
        used = 0
        for cell in cells:
            if lines[-1] and used + cell.shape[1] > max_width:
                lines.append([])
                used = 0
            lines[-1].append(cell)
            used += cell.shape[1] + scale
        rows = []
        for line in lines:
            height = max(c.shape[0] for c in line)
            row = np.full((height, sum(c.shape[1] + scale for c in line), 3), _PAPER, dtype=np.uint8)
            x = 0
            for cell in line:
                row[: cell.shape[0], x : x + cell.shape[1]] = cell
                x += cell.shape[1] + scale
            rows.append(row)
        caption = _text_block(_caption_lines(captions[i]) if captions else [f"example {i}"], scale)
        parts = [caption]
        for row in rows:
            parts += [row, np.full((scale, 1, 3), _PAPER, dtype=np.uint8)]
        width = max(p.shape[1] for p in parts)
        block = np.concatenate([_pad_to(p, p.shape[0], width) for p in parts])
        blocks.append(block)
    width = max(b.shape[1] for b in blocks) + 2 * gap
    out = []
    for block in blocks:
        out.append(np.full((gap, width, 3), _PAPER, dtype=np.uint8))
        framed = np.full((block.shape[0], width, 3), _PAPER, dtype=np.uint8)
        framed[:, gap : gap + block.shape[1]] = block
        out.append(framed)
        out.append(np.full((1, width, 3), 200, dtype=np.uint8))  # a thin rule between examples
    return np.concatenate(out[:-1] + [np.full((gap, width, 3), _PAPER, dtype=np.uint8)])
