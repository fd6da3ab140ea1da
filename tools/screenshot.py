"""Take the README's TensorBoard screenshots with headless Chromium against a local TensorBoard.

    python tools/screenshot.py [--runs runs] [--out docs]

Runs the demo into ``--runs`` when that folder has no event files, starts ``tensorboard`` on a free loopback port,
and saves ``docs/tensorboard_probe.png`` (the probe charts) and ``docs/tensorboard_saliency.png`` (a saliency grid).
Needs Debian's ``chromium`` package. Stops only the TensorBoard process it started.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

VIEWS = {
    "tensorboard_probe.png": "#custom_scalars&_smoothingWeight=0",
    "tensorboard_saliency.png": "#images&tagFilter=saliency%2Fsaliency&_smoothingWeight=0",
}
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--size", default="1400,1000")
    parser.add_argument("--budget-ms", type=int, default=20000, help="virtual time for the page to load its data")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("needs Chromium: apt-get install chromium", file=sys.stderr)
        return 1
    runs = Path(args.runs)
    if not any(runs.rglob("events.out.tfevents.*")):
        subprocess.run([sys.executable, "-m", "lightning_interp", "demo", "--out", str(runs), "--no-progress-bar"], check=True)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(runs), "--host", "127.0.0.1", "--port", str(port),
         "--load_fast=false", "--samples_per_plugin", "images=200"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}/"
        for _ in range(90):
            try:
                urllib.request.urlopen(base + "data/runs", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        time.sleep(3)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, fragment in VIEWS.items():
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run(
                    [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={args.size}",
                     f"--virtual-time-budget={args.budget_ms}", f"--screenshot={out / name}", base + fragment],
                    check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
                )  # fmt: skip
            print("wrote", out / name)
    finally:
        server.terminate()
        server.wait(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
