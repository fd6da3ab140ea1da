"""What users see: the demo's logs served by a real TensorBoard process, read through its HTTP data API."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from lightning_interp.cli import demo, demo_callbacks

FAMILIES = ("probe", "norm", "gradflow", "saliency", "representer")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base: str, path: str, **query: str) -> bytes:
    url = base + path + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR chunk
    return width, height


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    demo(epochs=2, out=out, variants=["batchnorm"], progress_bar=False)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(out), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast=false", "--samples_per_plugin", "images=100"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                tags = json.loads(get(base, "/data/plugin/scalars/tags"))
                if tags.get("batchnorm"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail("TensorBoard did not serve the run within 90 s")
            time.sleep(1)
        yield base, out
    finally:
        process.terminate()  # only the process this test started
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def families_present() -> set[str]:
    names = {type(cb).__name__ for cb in demo_callbacks()}
    expected = {"LinearProbeMonitor": "probe", "NormStatsMonitor": "norm", "GradFlowMonitor": "gradflow",
                "SaliencyMonitor": "saliency", "RepresenterMonitor": "representer"}  # fmt: skip
    return {family for name, family in expected.items() if name in names}


def test_every_scalar_family_is_served(served):
    base, _ = served
    tags = json.loads(get(base, "/data/plugin/scalars/tags"))["batchnorm"]
    for family in families_present() - {"saliency"}:
        assert any(tag.startswith(family + "/") for tag in tags), f"no {family}/ scalars in {sorted(tags)[:20]}"
    points = json.loads(get(base, "/data/plugin/scalars/scalars", run="batchnorm", tag="probe/val_acc/net.relu4"))
    assert len(points) == 2 and all(0.0 <= p[2] <= 1.0 for p in points)


def test_images_are_served_as_pngs_of_the_right_size(served):
    base, _ = served
    tags = json.loads(get(base, "/data/plugin/images/tags"))["batchnorm"]
    assert "probe/acc_vs_depth" in tags
    for family in families_present() & {"saliency", "representer"}:
        assert any(tag.startswith(family + "/") for tag in tags), f"no {family}/ images in {sorted(tags)}"
    samples = json.loads(get(base, "/data/plugin/images/images", run="batchnorm", tag="probe/acc_vs_depth", sample="0"))
    last = samples[-1]
    png = get(base, "/data/plugin/images/individualImage?" + last["query"])
    # 2 epochs x 5 layers (input + 4 ReLUs), 16 px per cell
    assert png_size(png) == (5 * 16, 2 * 16)


def test_custom_scalar_layout_groups_per_layer_curves(served):
    base, _ = served
    layout = json.loads(get(base, "/data/plugin/custom_scalars/layout"))
    categories = {c["title"]: c for c in layout["category"]}
    assert "probe" in categories
    charts = categories["probe"]["chart"]
    regexes = [r for chart in charts for r in chart["multiline"]["tag"]]
    assert r"probe/val_acc/.*" in regexes and r"probe/train_acc/.*" in regexes
    for family in families_present() & {"norm", "gradflow"}:
        assert family in categories, f"no {family} section in the custom-scalars layout"


def test_text_summary_is_served(served):
    base, _ = served
    tags = json.loads(get(base, "/data/plugin/text/tags"))["batchnorm"]
    assert "probe/layers/text_summary" in tags  # TensorBoard serves text tags with this suffix
    assert "summary/run/text_summary" in tags
    page = json.loads(get(base, "/data/plugin/text/text", run="batchnorm", tag="summary/run/text_summary"))
    text = page[-1]["text"]
    for name in ("LinearProbeMonitor", "net.relu4", "where to look", "samples_per_plugin"):
        assert name in text, f"{name!r} missing from the run summary"
