"""``add_rgb_image`` writes the same image summary as ``SummaryWriter.add_image(..., dataformats="HWC")``."""

from __future__ import annotations

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_interp.tensorboard import add_rgb_image


def _image(directory: str, tag: str):  # type: ignore[no-untyped-def]
    events = EventAccumulator(directory, size_guidance={"images": 0})
    events.Reload()
    return events.Images(tag)


def test_same_png_as_add_image(tmp_path) -> None:
    picture = np.random.default_rng(0).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    ours, theirs = SummaryWriter(str(tmp_path / "ours")), SummaryWriter(str(tmp_path / "theirs"))
    add_rgb_image(ours, "x/picture", picture, step=3)
    theirs.add_image("x/picture", picture, 3, dataformats="HWC")
    ours.close()
    theirs.close()
    (a,), (b,) = _image(str(tmp_path / "ours"), "x/picture"), _image(str(tmp_path / "theirs"), "x/picture")
    assert (a.step, a.height, a.width) == (b.step, b.height, b.width) == (3, 37, 53)
    assert a.encoded_image_string == b.encoded_image_string


def test_rejects_what_is_not_an_rgb_picture(tmp_path) -> None:
    writer = SummaryWriter(str(tmp_path))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        add_rgb_image(writer, "x", np.zeros((4, 4)), step=0)
    writer.close()
