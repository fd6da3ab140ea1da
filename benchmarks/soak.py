"""Soak run: the digits demo model for many epochs with every callback at its most frequent setting.

Reports resident memory after each epoch (current RSS from /proc), the hooks on the model, and the event-file size
per epoch. Pass: RSS after the last epoch within 5% of after epoch 3, no hook growth, event-file growth linear.

    python benchmarks/soak.py [--epochs 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import lightning as L
from lightning import Callback
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, parse_with_device, table, trainer_options  # noqa: E402

from lightning_interp.cli import demo_callbacks  # noqa: E402
from lightning_interp.data import DigitsDataModule  # noqa: E402
from lightning_interp.hooks import count_hooks  # noqa: E402
from lightning_interp.models import DigitsCNN  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Recorder(Callback):
    """Per epoch: RSS, hooks on the model, event-file bytes."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.rows: list[tuple[int, float, int, int]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        size = sum(f.stat().st_size for f in self.log_dir.rglob("events.out.tfevents.*"))
        self.rows.append((trainer.current_epoch + 1, rss_mb(), count_hooks(pl_module), size))


def most_frequent() -> list[Callback]:
    callbacks = demo_callbacks()
    for callback in callbacks:
        if hasattr(callback, "every_n_epochs"):
            callback.every_n_epochs = 1
    return callbacks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--baseline", action="store_true", help="no lightning-interp callback (for comparison)")
    args = parse_with_device(parser)
    with tempfile.TemporaryDirectory() as tmp:
        recorder = Recorder(Path(tmp))
        L.seed_everything(0, verbose=False)
        model = DigitsCNN()
        hooks_before = count_hooks(model)
        trainer = L.Trainer(
            max_epochs=args.epochs, **trainer_options(), logger=TensorBoardLogger(tmp, name="soak", version=""),
            callbacks=[*([] if args.baseline else most_frequent()), recorder], log_every_n_steps=1, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(model, DigitsDataModule())
        hooks_after = count_hooks(model)
    rows = recorder.rows
    growth = [b[3] - a[3] for a, b in zip(rows, rows[1:])]
    print(f"\nMachine: {machine()}\n")
    print(table([[e, f"{r:.0f}", h, f"{s / 1e6:.2f}"] for e, r, h, s in rows], ["epoch", "RSS MB", "hooks", "events MB"]))
    rss3, rss_last = rows[2][1], rows[-1][1]
    print(f"\nRSS epoch 3: {rss3:.0f} MB, epoch {rows[-1][0]}: {rss_last:.0f} MB, change {100 * (rss_last / rss3 - 1):+.1f}%")
    print(f"hooks before fit {hooks_before}, during fit {rows[-1][2]}, after fit {hooks_after}")
    if growth:
        print(f"event file growth per epoch: median {sorted(growth)[len(growth) // 2] / 1e3:.0f} kB, "
              f"min {min(growth) / 1e3:.0f} kB, max {max(growth) / 1e3:.0f} kB")  # fmt: skip


if __name__ == "__main__":
    main()
