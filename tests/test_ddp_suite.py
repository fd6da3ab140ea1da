"""The whole suite under Lightning's DDP: 2 CPU processes (gloo, ``ddp_spawn``), every callback at its most
frequent setting, and the situations that deadlock naive distributed code, all in one run of 3 epochs:

- the ranks hold different numbers of validation batches (3 and 2);
- every forward of rank 1 raises during the first epoch's dumps (saliency maps, representer refit);
- rank 1's last training batch holds NaN (the model's weights become NaN for epoch 3's validation and dumps).

Checked: the run ends; probe replicas are bitwise identical; every scalar of ours that a rank logged is the value the
ranks agree on, and the step statistics are the mean of the two ranks' own values (synced, not rank 0's); the
representer refit saw both ranks' shares of the training set; TensorBoard output exists once (rank 0's event file,
one image per tag and step); the failures were counted on the ranks where they happened.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, DistributedSampler, Subset

from lightning_interp.callbacks import (
    GradFlowMonitor,
    LinearProbeMonitor,
    NormStatsMonitor,
    RepresenterMonitor,
    SaliencyMonitor,
)
from lightning_interp.data import DigitsDataModule
from lightning_interp.models import DigitsCNN
from tests.helpers import TAG_FAMILIES, every_callback, quiet_trainer

TRAIN_BATCHES, EPOCHS, NAN_STEP = 3, 3, 8  # global steps 0..8; logged steps (log_every_n_steps=2): 1, 3, 5, 7
REPRESENTER_EXAMPLES = 200


class ChaosCNN(DigitsCNN):
    """DigitsCNN whose rank 1 feeds NaN at global step ``NAN_STEP`` and raises in every forward while ``explode``."""

    explode = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explode:
            raise RuntimeError("forward raised on purpose on rank 1")
        return super().forward(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_rank == 1 and self.global_step == NAN_STEP:
            x = torch.full_like(x, float("nan"))
        return super().training_step((x, y), batch_idx)


class UnevenDigits(DigitsDataModule):
    """Training data sharded evenly (DistributedSampler, no shuffling); validation: rank 0 gets 3 batches of 32,
    rank 1 gets 2."""

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(
            self.train_dataset, dist.get_world_size(), dist.get_rank(), shuffle=False
        )
        return DataLoader(self.train_dataset, batch_size=32, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        rows = range(0, 96) if dist.get_rank() == 0 else range(96, 160)
        return DataLoader(Subset(self.val_dataset, list(rows)), batch_size=32)


class ExplodeOnRank1(Callback):
    """Makes rank 1's forward raise during the first epoch-end (listed before our callbacks, so it runs first)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: ChaosCNN) -> None:
        pl_module.explode = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: ChaosCNN) -> None:
        pl_module.explode = trainer.global_rank == 1 and trainer.current_epoch == 0


class DumpPerRank(Callback):
    """Saves what each rank holds at the end of fit."""

    def __init__(self, callbacks: list[Any], directory: str) -> None:
        self.callbacks, self.directory = callbacks, directory

    def on_train_end(self, trainer: L.Trainer, pl_module: ChaosCNN) -> None:
        by_type = {type(c).__name__: c for c in self.callbacks}
        representer = by_type["RepresenterMonitor"]
        torch.save(
            {
                "probes": by_type["LinearProbeMonitor"].bank.state_dict()["probes"],
                "metrics": {
                    k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(TAG_FAMILIES)
                },
                "local": {**by_type["NormStatsMonitor"].last, **by_type["GradFlowMonitor"].last},
                "problems": {name: dict(c.problems.counts) for name, c in by_type.items()},
                "representer_dumps": representer.dumps,
                "saliency_dumps": by_type["SaliencyMonitor"].dumps,
            },
            f"{self.directory}/rank{trainer.global_rank}.pt",
        )


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ddp_suite")
    callbacks = every_callback(representer_examples=REPRESENTER_EXAMPLES)
    trainer = quiet_trainer(
        [ExplodeOnRank1(), *callbacks, DumpPerRank(callbacks, str(root))],
        strategy="ddp_spawn",
        devices=2,
        max_epochs=EPOCHS,
        limit_train_batches=TRAIN_BATCHES,
        log_every_n_steps=2,
        use_distributed_sampler=False,
        logger=TensorBoardLogger(str(root), name="tb", version="", default_hp_metric=False),
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(ChaosCNN(dropout=0.0), UnevenDigits())
    return {
        "root": root,
        "ranks": [torch.load(root / f"rank{r}.pt", weights_only=False) for r in (0, 1)],
    }


pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="gloo process group test written for Linux CI"),
    pytest.mark.timeout(420),  # a deadlock fails the test instead of hanging CI
]


def test_probe_replicas_identical(ddp_run: dict[str, Any]) -> None:
    rank0, rank1 = (r["probes"] for r in ddp_run["ranks"])
    assert len(rank0) == 5 and rank0.keys() == rank1.keys()
    for layer, state in rank0.items():
        for key, value in state.items():
            assert torch.equal(value, rank1[layer][key]), f"{layer}.{key} differs across ranks"


def test_every_family_logged_and_equal_on_both_ranks(ddp_run: dict[str, Any]) -> None:
    rank0, rank1 = (r["metrics"] for r in ddp_run["ranks"])
    for family in TAG_FAMILIES:
        assert any(tag.startswith(family) for tag in rank0), f"nothing of {family} reached callback_metrics"
    assert rank0.keys() == rank1.keys()
    differ = {tag: (rank0[tag], rank1[tag]) for tag in rank0 if not _same(rank0[tag], rank1[tag])}
    assert not differ, f"ranks disagree: {differ}"
    # the input layer's probe never sees the NaN weights: a real accuracy after 3 epochs
    assert 0.5 < rank0["probe/val_acc/input"] <= 1.0


def test_step_statistics_are_the_mean_of_both_ranks(ddp_run: dict[str, Any]) -> None:
    (metrics, local0), (_, local1) = ((r["metrics"], r["local"]) for r in ddp_run["ranks"])
    checked = 0
    for tag in ("norm/net.relu2/act_mean", "norm/net.norm1/out_std", "gradflow/net.relu1/grad_norm"):
        assert tag in metrics and tag in local0, f"{tag} missing"
        assert local0[tag] != local1[tag], f"{tag}: both ranks saw the same data?"
        assert metrics[tag] == pytest.approx((local0[tag] + local1[tag]) / 2, rel=1e-5), tag
        checked += 1
    assert checked == 3


def test_failures_counted_where_they_happened(ddp_run: dict[str, Any]) -> None:
    rank0, rank1 = ddp_run["ranks"]
    assert rank1["problems"]["SaliencyMonitor"].get("dump_failed", 0) >= 1
    # the representer's collectives: rank 1 failed its share, rank 0 learned of it and skipped as well
    assert rank1["problems"]["RepresenterMonitor"].get("dump_failed", 0) >= 1
    assert rank0["problems"]["RepresenterMonitor"].get("dump_failed", 0) >= 1
    # the NaN batch: rank 1 saw NaN activations; the probes skipped that step on both ranks (replicas identical)
    assert rank1["problems"]["LinearProbeMonitor"].get("nan_activations", 0) >= 1


def test_representer_gathered_both_shares(ddp_run: dict[str, Any]) -> None:
    run = ddp_run["root"] / "tb"
    # epoch 0's dump failed on rank 1 (skipped everywhere), epoch 2's on the NaN weights: only epoch 1's is there
    assert sorted(p.name for p in run.glob("representer_epoch*.pt")) == ["representer_epoch1.pt"]
    saved = torch.load(run / "representer_epoch1.pt", weights_only=False)
    indices = saved["indices"]
    assert len(indices) == REPRESENTER_EXAMPLES and len(set(indices.tolist())) == REPRESENTER_EXAMPLES


def test_tensorboard_written_once(ddp_run: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    root: Path = ddp_run["root"]
    event_files = sorted(root.rglob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files
    events = EventAccumulator(str(event_files[0].parent), size_guidance={IMAGES: 0})
    events.Reload()
    images = events.Tags()["images"]
    assert "probe/acc_vs_depth" in images and any(t.startswith("saliency/") for t in images)
    for tag in images:
        steps = [e.step for e in events.Images(tag)]
        assert len(steps) == len(set(steps)), f"{tag} written twice at a step: {steps}"
    assert len(events.Images("probe/acc_vs_depth")) == EPOCHS


def test_callback_types_present() -> None:
    names = {type(c) for c in every_callback()}
    assert names == {
        LinearProbeMonitor,
        NormStatsMonitor,
        GradFlowMonitor,
        SaliencyMonitor,
        RepresenterMonitor,
    }
