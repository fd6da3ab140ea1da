"""LinearProbeMonitor under Lightning's DDP (2 CPU processes, gloo): replicas identical, metrics synced."""

from __future__ import annotations

import sys

import pytest
import torch
from lightning import Callback

from lightning_interp.callbacks import LinearProbeMonitor
from lightning_interp.data import DigitsDataModule
from lightning_interp.models import DigitsCNN
from tests.helpers import quiet_trainer


class DumpPerRank(Callback):
    """Saves each rank's probe weights and logged probe metrics at the end of fit."""

    def __init__(self, monitor: LinearProbeMonitor, directory: str) -> None:
        self.monitor, self.directory = monitor, directory

    def on_train_end(self, trainer, pl_module) -> None:
        bank = self.monitor.bank.state_dict()
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("probe/")}
        torch.save(
            {"probes": bank["probes"], "metrics": metrics, "history": self.monitor.history},
            f"{self.directory}/rank{trainer.global_rank}.pt",
        )


@pytest.mark.skipif(sys.platform != "linux", reason="gloo process group test written for Linux CI")
def test_probe_replicas_identical_and_metrics_synced(tmp_path):
    monitor = LinearProbeMonitor()
    trainer = quiet_trainer(
        [monitor, DumpPerRank(monitor, str(tmp_path))],
        strategy="ddp_spawn",
        devices=2,
        max_epochs=2,
        limit_train_batches=6,
        limit_val_batches=2,
    )
    trainer.fit(DigitsCNN(), DigitsDataModule(batch_size=32))
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0["probes"].keys() == rank1["probes"].keys() and len(rank0["probes"]) == 5
    for layer, state in rank0["probes"].items():
        for key, value in state.items():
            assert torch.equal(value, rank1["probes"][layer][key]), f"{layer}.{key} differs across ranks"
    assert rank0["metrics"] and rank0["metrics"] == rank1["metrics"]
    assert rank0["history"] == rank1["history"]
