"""Train the same networks with BatchNorm, LayerNorm, GroupNorm and no normalization on the digits, watch them
with NormStatsMonitor, GradFlowMonitor and LinearProbeMonitor, and compare the runs side by side.

    python examples/compare_normalization.py --out runs/normalization --epochs 8

Writes one TensorBoard run per variant under ``--out`` (``mlp-batch``, ``mlp-none``, ``cnn-layer``, ...), then
``--out/compare.md`` and ``--out/compare.png`` (the same as ``lightning-interp compare --out``), and prints
the table. ``tensorboard --logdir <out>`` shows the curves; the custom-scalars tab has one chart per
statistic.
"""

from __future__ import annotations

import argparse
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_interp.callbacks import GradFlowMonitor, LinearProbeMonitor, NormStatsMonitor
from lightning_interp.compare import compare_command
from lightning_interp.data import DigitsDataModule
from lightning_interp.models import DeepMLP, DigitsCNN

NORMS = ("batch", "layer", "group", "none")


def build(model: str, norm: str, depth: int) -> L.LightningModule:
    if model == "mlp":
        return DeepMLP(depth=depth, width=64, norm=norm, activation="tanh")
    return DigitsCNN(norm=norm)


def probe_layers(model: str, depth: int) -> list[str] | None:
    """The CNN's four hidden layers; for the deep MLP every fourth one and the last (probes cost per
    layer)."""
    if model != "mlp":
        return None
    return ["input"] + [f"net.act{i}" for i in sorted({*range(0, depth, 4), depth - 1})]


def run(model: str, norm: str, out: Path, epochs: int, depth: int, seed: int) -> float:
    name = f"{model}-{norm}"
    shutil.rmtree(out / name, ignore_errors=True)
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        log_every_n_steps=5,
        logger=TensorBoardLogger(save_dir=str(out), name=name, version=0),
        callbacks=[
            NormStatsMonitor(every_n_epochs=4),
            GradFlowMonitor(every_n_epochs=4),
            LinearProbeMonitor(layers=probe_layers(model, depth)),
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(build(model, norm, depth), datamodule=DigitsDataModule(batch_size=64, seed=seed))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/normalization"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--depth", type=int, default=20, help="hidden layers of the deep MLP")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--norms", default=",".join(NORMS), help="comma-separated: " + ", ".join(NORMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (these networks are too small for more)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    args.out.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        for norm in args.norms.split(","):
            seconds = run(model, norm, args.out, args.epochs, args.depth, args.seed)
            print(f"trained {model}-{norm} in {seconds:.0f} s", flush=True)
    text = compare_command(args.out)
    print(text)
    return text


if __name__ == "__main__":
    main()
