"""No host synchronisation on unlogged training steps: under a TorchDispatchMode that counts
``aten._local_scalar_dense`` (what ``.item()``, ``bool(tensor)``, ``int(tensor)`` and ``.tolist()`` dispatch to), an
unlogged training step with a monitor attached makes no more such calls than the same step without it. On a GPU
each such call would stall the CPU until the step's kernels have finished."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_interp.callbacks import GradFlowMonitor, LinearProbeMonitor, NormStatsMonitor
from lightning_interp.data import DigitsDataModule
from lightning_interp.models import DigitsCNN
from tests.helpers import quiet_trainer

WATCHED_STEP = 3  # not the first step (which checks the targets once) and not a logged one (log_every_n_steps=50)


class ScalarReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class Open(Callback):
    """First in the list: enters the counting mode when the watched step starts."""

    def __init__(self, mode: ScalarReads) -> None:
        self.mode = mode

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx == WATCHED_STEP:
            self.mode.__enter__()


class Close(Callback):
    """Last in the list: leaves it when the step has ended (every other callback's batch-end work included)."""

    def __init__(self, mode: ScalarReads) -> None:
        self.mode = mode

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx == WATCHED_STEP:
            self.mode.__exit__(None, None, None)


def scalar_reads(callbacks: list[Callback], **trainer_options: object) -> int:
    mode = ScalarReads()
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer([Open(mode), *callbacks, Close(mode)], max_steps=WATCHED_STEP + 1, limit_val_batches=0,
                            log_every_n_steps=50, **trainer_options)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DigitsCNN(norm="batch"), DigitsDataModule(batch_size=32))
    return mode.count


def test_the_counter_sees_a_host_sync():
    class Syncing(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            float(batch[0].sum())

    assert scalar_reads([Syncing()]) == scalar_reads([]) + 1


MONITORS = [lambda: LinearProbeMonitor(), lambda: LinearProbeMonitor(fit="online"), lambda: NormStatsMonitor(),
            lambda: GradFlowMonitor()]  # fmt: skip
MONITOR_IDS = ["probes-frozen", "probes-online", "norm-stats", "grad-flow"]


@pytest.mark.parametrize("make", MONITORS, ids=MONITOR_IDS)
def test_unlogged_step_adds_no_host_sync(make):
    assert scalar_reads([make()]) <= scalar_reads([])


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("make", MONITORS, ids=MONITOR_IDS)
def test_unlogged_cuda_step_adds_no_host_sync(make, precision):
    """The same count on a GPU, where each extra read would stall the CPU until the step's kernels finish."""
    options = {"accelerator": "cuda", "precision": precision}
    assert scalar_reads([make()], **options) <= scalar_reads([], **options)
