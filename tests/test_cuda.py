"""The suite on a GPU (skipped where torch sees no CUDA device; ``benchmarks/gpu_check.sh`` runs these).

What is checked is what differs on CUDA: the callbacks' passes and caches follow the model to the device, mixed
precision does not break the statistics or the probe fits, the numbers match a CPU run of the same model, and no
hook is left behind."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch

from lightning_interp.callbacks import (
    GradFlowMonitor,
    LinearProbeMonitor,
    NormStatsMonitor,
    RepresenterMonitor,
    SaliencyMonitor,
)
from lightning_interp.data import DigitsDataModule
from lightning_interp.models import DigitsCNN
from tests.helpers import quiet_trainer

pytestmark = pytest.mark.cuda


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def fit_suite(accelerator: str, precision: str, epochs: int = 2) -> tuple[list[L.Callback], DigitsCNN]:
    L.seed_everything(0, verbose=False)
    callbacks = [LinearProbeMonitor(), NormStatsMonitor(), GradFlowMonitor(), SaliencyMonitor(),
                 RepresenterMonitor(every_n_epochs=1)]  # fmt: skip
    model = DigitsCNN()
    trainer = quiet_trainer(callbacks, accelerator=accelerator, precision=precision, max_epochs=epochs,
                            log_every_n_steps=5)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=DigitsDataModule())
    return callbacks, model


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_every_callback_at_defaults_runs_on_cuda(precision: str) -> None:
    callbacks, model = fit_suite("cuda", precision)
    probes = callbacks[0]
    assert isinstance(probes, LinearProbeMonitor)
    assert probes.history["val"] and all(
        0.0 <= values[-1] <= 1.0 and not math.isnan(values[-1]) for values in probes.history["val"].values()
    )
    assert all(not getattr(cb, "idle", None) for cb in callbacks)
    assert hook_count(model) == 0
    assert all(p.grad is None or p.grad.device.type == "cuda" for p in model.parameters())


def test_probe_readings_on_cuda_match_the_cpu() -> None:
    """fp32 on both, one epoch (the two trainings differ only by kernels' rounding): the frozen fit is the same
    convex problem, so the readings agree up to a few of the 360 validation digits."""
    cpu, _ = fit_suite("cpu", "32-true", epochs=1)
    gpu, _ = fit_suite("cuda", "32-true", epochs=1)
    for layer, values in cpu[0].history["val"].items():
        assert abs(values[-1] - gpu[0].history["val"][layer][-1]) <= 0.02, layer
